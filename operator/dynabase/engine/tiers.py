"""Which tier's limits apply to a tenant now (pure; a policy that cannot be used is its error)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from dynabase.desired.effective import ResolveError, find_policy
from dynabase.desired.transition import decide_tier
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy

from .results import TenantResult


def resolve(tenant: TenantDatabase, policies: dict[str, TierPolicy], previous: TenantDatabaseStatus | None,
            now: dt.datetime, unusable: Mapping[str, str] | None = None) -> TenantResult:
    """``unusable``: declared policies the engine cannot use, with why (their tenants are told so)."""
    result = TenantResult(tenant)
    try:
        policy = find_policy(tenant, policies, unusable)
        result.decision = decide_tier(
            tenant, policy,
            applied_tier=previous.applied_tier if previous else None,
            pending_tier=previous.pending_tier if previous else None,
            effective_at=previous.effective_at if previous else None,
            now=now,
        )
    except ResolveError as exc:
        result.error = exc
    return result
