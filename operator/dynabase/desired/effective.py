"""Effective limits: the tier from the referenced TierPolicy, the tenant's
overrides merged field by field on top, and documented defaults beneath both.

The section types and their defaults are declared in ``dynabase.spec.limits``;
the rules over several limits are checked here again on the merged result,
with the same predicates the CRD and ``dynabase validate`` use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from dynabase.spec import TenantDatabase, TierLimits, TierPolicy
from dynabase.spec.limit import resolve
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
    "effective_limits", "find_policy", "merge",
]


class ResolveError(ValueError):
    """The tenant's declaration cannot be resolved; the message says what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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
    sections: dict[str, Any] = {}
    for section, section_type in SECTION_TYPES.items():
        declared: dict[str, Any] = {}
        for layer in layers:
            declared.update(_declared(layer, section))
        sections[section] = resolve(section_type, FIELDS[section], declared)
    limits = EffectiveLimits(tier=tier_name, rank=rank, **sections)
    _check(limits)
    return limits


def _check(limits: EffectiveLimits) -> None:
    for rule in CROSS_RULES:
        values = rule.values_in(limits if rule.at is None else getattr(limits, rule.at))
        if not rule.holds(*values):
            raise ResolveError(
                "InvalidLimits",
                f"tier {limits.tier} with overrides: {rule.explain(values)}",
            )


def find_policy(tenant: TenantDatabase, policies: dict[str, TierPolicy]) -> TierPolicy:
    policy = policies.get(tenant.spec.tier_policy_ref)
    if policy is None:
        known = ", ".join(sorted(policies)) or "none"
        raise ResolveError(
            "TierPolicyNotFound",
            f"TierPolicy '{tenant.spec.tier_policy_ref}' does not exist (known: {known}); create it "
            "or fix spec.tierPolicyRef",
        )
    return policy


def effective_limits(tenant: TenantDatabase, policy: TierPolicy, tier_name: str) -> EffectiveLimits:
    tier = policy.spec.tiers.get(tier_name)
    if tier is None:
        known = ", ".join(sorted(policy.spec.tiers))
        raise ResolveError(
            "TierNotFound",
            f"tier '{tier_name}' is not in TierPolicy '{policy.name}' (tiers: {known}); fix spec.tier",
        )
    return _merged(tier_name, tier.rank, tier, tenant.spec.overrides)


@functools.lru_cache(maxsize=8192)
def _merged(tier_name: str, rank: int, tier: TierLimits, overrides: TierLimits | None) -> EffectiveLimits:
    # Models are frozen and hashable: thousands of tenants on the same tier share one merge.
    return merge(tier_name, rank, [tier, overrides])
