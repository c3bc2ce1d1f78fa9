"""A tenant's month projected from its first days, for the tenant portal. Pure.

Month-to-date usage is extrapolated at its average rate so far to the month's end
and priced by ``dynabase.desired.charges.price_month`` — the arithmetic the
billing close uses — so the projection is what the invoice would say if the
rest of the month went like its start (a pending downgrade is not anticipated).
The same projected usage is priced on the next tier as the upgrade prompt.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy

from .charges import SECONDS_PER_HOUR, TenantMonth, month_bounds, price_month
from .cost import FittedModel, UsageTotals

LIMIT_HITS = ("rejected_connections", "rejected", "throttled")  # the proxy's counters of refused work


@dataclass(frozen=True)
class Projection:
    month: str
    elapsed_hours: float  # of the month so far (since the tenant was created, if that was later)
    remaining_hours: float
    to_date: TenantMonth  # usage so far against the whole month's included usage
    projected: TenantMonth  # the month at the same pace to its end
    on_next_tier: TenantMonth | None  # the projected month priced on the next tier


def began_at(status: TenantDatabaseStatus | None, month_start: dt.datetime) -> dt.datetime:
    """When the tenant's month began: its creation (a change from no tier) if within the month."""
    created = [c.at for c in (status.history if status else []) if c.from_tier is None]
    return max([month_start, *created[-1:]])


def project_month(month: str, policies: Mapping[str, TierPolicy], tenant: TenantDatabase,
                  status: TenantDatabaseStatus | None, docs: Sequence[Mapping[str, Any]], model: FittedModel,
                  now: dt.datetime, next_tier: str | None = None) -> Projection:
    """``docs``: this tenant's hourly (or coarser) usage documents of the month so far."""
    start, end = month_bounds(month)
    key = tenant.key
    statuses = {key: status} if status is not None else {}
    to_date = price_month(month, policies, [tenant], statuses, docs, model, "portal").tenant(key)
    elapsed = max((now - began_at(status, start)).total_seconds(), 60.0) / SECONDS_PER_HOUR
    remaining = max((end - now).total_seconds(), 0.0) / SECONDS_PER_HOUR
    scale, used = remaining / elapsed, to_date.usage
    tier = (status.applied_tier if status is not None else None) or tenant.spec.tier
    rest = {"tenant": key, "hour": int(now.timestamp()) // 3600, "tier": tier, "queries": used.queries * scale,
            "query_seconds": used.query_seconds * scale, "connections": used.connections * scale}
    projected = price_month(month, policies, [tenant], statuses, [*docs, rest], model, "portal").tenant(key)
    on_next = None
    if next_tier is not None:
        # The whole month on the next tier: no history, every hour relabelled.
        moved = tenant.model_copy(update={"spec": tenant.spec.model_copy(update={"tier": next_tier}), "status": None})
        relabelled = [{**doc, "tier": next_tier} for doc in [*docs, rest]]
        on_next = price_month(month, policies, [moved], {}, relabelled, model, "portal").tenant(key)
    return Projection(month, elapsed, remaining, to_date, projected, on_next)


def daily_vcpu_hours(docs: Sequence[Mapping[str, Any]], model: FittedModel, tenant: str,
                     month: str) -> list[float]:
    """vCPU-hours used on each day of the month (index 0 is the 1st), by the same model as the bill."""
    start, end = month_bounds(month)
    days = [UsageTotals() for _ in range((end - start).days)]
    first_hour = int(start.timestamp()) // 3600
    for doc in docs:
        day = (int(_number(doc, "hour")) - first_hour) // 24
        if 0 <= day < len(days):
            days[day] = days[day] + UsageTotals(_number(doc, "queries"), _number(doc, "query_seconds"),
                                                _number(doc, "connections"))
    return [model.vcpu_hours(tenant, usage) for usage in days]


def counter_total(docs: Sequence[Mapping[str, Any]], name: str, *, since_hour: int | None = None) -> float:
    """A counter summed over the documents (from ``since_hour`` on, when given)."""
    return sum(_number(doc, name) for doc in docs if since_hour is None or _number(doc, "hour") >= since_hour)


def _number(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
