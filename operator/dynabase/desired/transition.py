"""Tier transitions: upgrades at once, downgrades after a grace period.

Pure: given the declared tier, what was applied, any pending downgrade and the
clock, decide which tier's limits apply now and what stays pending.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dynabase.spec import TenantDatabase, TierPolicy

from .effective import EffectiveLimits, effective_limits


@dataclass(frozen=True)
class TierDecision:
    limits: EffectiveLimits  # what applies now
    pending_tier: str | None
    effective_at: dt.datetime | None
    change: str  # "none" | "initial" | "upgrade" | "downgrade" | "lateral" | "scheduled" | "cancelled"

    @property
    def applied_tier(self) -> str:
        return self.limits.tier


def decide_tier(
    tenant: TenantDatabase,
    policy: TierPolicy,
    *,
    applied_tier: str | None,
    pending_tier: str | None,
    effective_at: dt.datetime | None,
    now: dt.datetime,
) -> TierDecision:
    declared = effective_limits(tenant, policy, tenant.spec.tier)
    if applied_tier is None or applied_tier not in policy.spec.tiers:
        # New tenant, or its old tier was removed from the policy: nothing to protect.
        return TierDecision(declared, None, None, "initial" if applied_tier is None else "lateral")
    current = effective_limits(tenant, policy, applied_tier)
    if declared.tier == current.tier:
        change = "cancelled" if pending_tier is not None else "none"
        return TierDecision(current, None, None, change)
    if declared.rank > current.rank:
        return TierDecision(declared, None, None, "upgrade")
    if declared.rank == current.rank:
        return TierDecision(declared, None, None, "lateral")
    # Downgrade: the grace period of the tier being left protects the customer.
    grace = current.lifecycle.downgrade_grace_period
    if pending_tier == declared.tier and effective_at is not None:
        due = effective_at
    else:
        due = now + dt.timedelta(milliseconds=grace.milliseconds)
    if now >= due:
        return TierDecision(declared, None, None, "downgrade")
    return TierDecision(current, declared.tier, due, "scheduled")
