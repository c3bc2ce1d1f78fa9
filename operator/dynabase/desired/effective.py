"""Effective limits: the tier from the referenced TierPolicy, the tenant's
overrides merged field by field on top, and documented defaults beneath both.

The section types and their defaults are declared in ``dynabase.spec.limits``;
the rules over several limits are checked here again on the merged result,
with the same predicates the CRD and ``dynabase validate`` use.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynabase.spec import TenantDatabase, TierLimits, TierPolicy
from dynabase.spec.limit import CrossRule, resolve
from dynabase.spec.limits import (
    CROSS_RULES,
    FIELDS,
    SECTION_TYPES,
    BillingEffective,
    LifecycleEffective,
    Limits,
    MongoEffective,
    PgBouncerEffective,
    PostgresEffective,
    ProxyEffective,
    RailwayEffective,
    RedisEffective,
)

__all__ = [
    "BillingEffective", "EffectiveLimits", "LifecycleEffective", "MongoEffective", "PgBouncerEffective",
    "PostgresEffective", "ProxyEffective", "RailwayEffective", "RedisEffective", "ResolveError",
    "broken_rules", "effective_limits", "find_policy", "merge", "merge_unchecked", "rule_field",
]


class ResolveError(ValueError):
    """The tenant's declaration cannot be resolved; the message says what to fix (and ``field`` where)."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


@dataclass(frozen=True, kw_only=True)
class EffectiveLimits(Limits):
    tier: str
    rank: int


def _declared(limits: TierLimits | None, section: str) -> dict[str, Any]:
    model = getattr(limits, section, None) if limits is not None else None
    if model is None:
        return {}
    return {f.name: getattr(model, f.name) for f in FIELDS[section] if getattr(model, f.name) is not None}


def merge(tier_name: str, rank: int, layers: list[TierLimits | None]) -> EffectiveLimits:
    """Later layers win field by field; defaults fill what no layer declares."""
    limits = merge_unchecked(tier_name, rank, layers)
    broken = broken_rules(limits)
    if broken:
        rule, values = broken[0]
        raise ResolveError("InvalidLimits", f"tier {limits.tier}: {rule.explain(values)}", field=rule_field(rule))
    return limits


def merge_unchecked(tier_name: str, rank: int, layers: list[TierLimits | None]) -> EffectiveLimits:
    """The merge, before the rules over several limits are checked."""
    sections: dict[str, Any] = {}
    for section, section_type in SECTION_TYPES.items():
        declared: dict[str, Any] = {}
        for layer in layers:
            declared.update(_declared(layer, section))
        sections[section] = resolve(section_type, FIELDS[section], declared)
    return EffectiveLimits(tier=tier_name, rank=rank, **sections)


def broken_rules(limits: EffectiveLimits) -> list[tuple[CrossRule, list[object]]]:
    """The rules over several limits that merged limits break, with the operands' values."""
    out = []
    for rule in CROSS_RULES:
        values = rule.values_in(limits if rule.at is None else getattr(limits, rule.at))
        if not rule.holds(*values):
            out.append((rule, values))
    return out


def rule_field(rule: CrossRule) -> str:
    """Where a broken rule points, relative to the limits (``pgbouncer.poolSize``)."""
    path = f"{('.' + rule.at) if rule.at else ''}{rule.field_path or ''}"
    return path.lstrip(".") or ", ".join(f"{f.section}.{f.alias}" for f in rule.operands)


def find_policy(tenant: TenantDatabase, policies: dict[str, TierPolicy],
                unusable: Mapping[str, str] | None = None) -> TierPolicy:
    """The tenant's policy; ``unusable`` names declared policies the engine cannot use, with why."""
    policy = policies.get(tenant.spec.tier_policy_ref)
    if policy is None and unusable and tenant.spec.tier_policy_ref in unusable:
        raise ResolveError(
            "TierPolicyInvalid",
            f"TierPolicy '{tenant.spec.tier_policy_ref}' cannot be used: "
            f"{unusable[tenant.spec.tier_policy_ref]}; fix the policy (its status says the same)",
            field="spec.tierPolicyRef",
        )
    if policy is None:
        known = ", ".join(sorted(policies)) or "none"
        raise ResolveError(
            "TierPolicyNotFound",
            f"TierPolicy '{tenant.spec.tier_policy_ref}' does not exist (known: {known}); create it "
            "or fix spec.tierPolicyRef", field="spec.tierPolicyRef",
        )
    return policy


def effective_limits(tenant: TenantDatabase, policy: TierPolicy, tier_name: str) -> EffectiveLimits:
    tier = policy.spec.tiers.get(tier_name)
    if tier is None:
        known = ", ".join(sorted(policy.spec.tiers))
        raise ResolveError(
            "TierNotFound",
            f"tier '{tier_name}' is not in TierPolicy '{policy.name}' (tiers: {known}); fix spec.tier",
            field="spec.tier",
        )
    try:
        return _merged(tier_name, tier.rank, tier, tenant.spec.overrides)
    except ResolveError as exc:
        # Say where to fix it: the tenant's overrides, or (without any) the tier it picked.
        overrides = tenant.spec.overrides is not None
        raise ResolveError(
            exc.reason,
            f"tier {tier_name} of TierPolicy '{policy.name}'{' with the overrides' if overrides else ''}: "
            f"{exc.message.removeprefix(f'tier {tier_name}: ')}",
            field=f"spec.overrides.{exc.field}" if overrides else "spec.tier",
        ) from None


@functools.lru_cache(maxsize=8192)
def _merged(tier_name: str, rank: int, tier: TierLimits, overrides: TierLimits | None) -> EffectiveLimits:
    # Models are frozen and hashable: thousands of tenants on the same tier share one merge.
    return merge(tier_name, rank, [tier, overrides])
