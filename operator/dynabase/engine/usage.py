"""Usage: the month's metered usage per tenant (cached), judged against each tier's included
usage, and the hourly copy of the proxies' usage into MongoDB."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.cost import FittedModel, UsageTotals, usage_by_tenant
from dynabase.desired.mongo import rollup
from dynabase.desired.overage import carried_overage, decide_overage, month_start
from dynabase.spec import TenantDatabaseStatus

from . import metrics
from .failures import describe_error
from .results import TenantResult

log = logging.getLogger(__name__)


@dataclass
class MonthUsage:
    """Month-to-date usage per tenant. Hours before the previous one no longer change: they are
    read and summed once, so a pass reads and parses only the last two hours.

    Within a month a tenant's counters only grow. A lower reading means metering was lost
    (a Redis restart without persistence, before the proxies wrote their hours again), not
    less use: each counter never falls below the highest this process read this month."""

    month: int = -1  # the month's first hour (hours since the epoch)
    final_through: int = -1  # the last hour summed into ``final``
    final: dict[str, UsageTotals] = field(default_factory=dict)
    highest: dict[str, UsageTotals] = field(default_factory=dict)  # this month's highest reading per tenant

    async def read(self, proxy: ProxyBackend, now: dt.datetime) -> dict[str, UsageTotals]:
        first, current = int(month_start(now).timestamp()) // 3600, int(now.timestamp()) // 3600
        if self.month != first:
            self.month, self.final_through, self.final, self.highest = first, first - 1, {}, {}
        final_hours = list(range(self.final_through + 1, current - 1))
        recent_hours = list(range(max(first, current - 1), current + 1))
        fetched = await proxy.usage_hours(final_hours + recent_hours)

        def totals(hours: list[int]) -> dict[str, UsageTotals]:
            docs = [doc for hour in hours for doc in rollup(hour, fetched[hour]).values()]
            return {tenant: value for tenant, (value, _tier) in usage_by_tenant(docs).items()}
        for tenant, value in totals(final_hours).items():
            self.final[tenant] = self.final.get(tenant, UsageTotals()) + value
        if final_hours:
            self.final_through = final_hours[-1]
        month = dict(self.final)
        for tenant, value in totals(recent_hours).items():
            month[tenant] = month.get(tenant, UsageTotals()) + value
        for tenant, value in month.items():
            month[tenant] = self.highest[tenant] = highest_of(self.highest.get(tenant), value)
        return {**self.highest, **month}


def highest_of(before: UsageTotals | None, now: UsageTotals) -> UsageTotals:
    """Each counter at the higher of the two readings."""
    if before is None:
        return now
    return UsageTotals(max(before.queries, now.queries), max(before.query_seconds, now.query_seconds),
                       max(before.connections, now.connections))


def candidates(results: list[TenantResult]) -> list[TenantResult]:
    """Tenants whose tier includes usage (and so can go over it)."""
    return [r for r in results if r.limits is not None and r.limits.billing.included_vcpu_hours > 0]


async def judge_usage(proxy: ProxyBackend | None, month: MonthUsage, cost_model: FittedModel,
                      cost_models: PostgresCostModels | None, results: list[TenantResult],
                      statuses: Mapping[str, TenantDatabaseStatus], now: dt.datetime) -> FittedModel:
    """Set ``TenantResult.overage``: month-to-date usage (the proxies' metering, estimated as
    vCPU-hours) against each tier's included usage. Returns the cost model in force: the
    stored one when there is a store (the usage report and billing read the same)."""
    judged = candidates(results)
    if not judged or proxy is None:
        return cost_model
    try:
        usage = await month.read(proxy, now)
        if cost_models is not None:
            cost_model = await cost_models.current()
    except Exception as exc:
        usage_unknown(judged, statuses, now, exc)
        return cost_model
    for result in judged:
        assert result.limits is not None
        used = cost_model.vcpu_hours(result.key, usage.get(result.key, UsageTotals()))
        previous = statuses.get(result.key)
        result.overage = decide_overage(result.limits.billing, used, previous.usage if previous else None, now)
        ratio = result.overage.ratio if result.overage is not None else None
        metrics.set_usage_ratio(result.key, result.limits.tier, round(ratio, 4) if ratio is not None else None)
    return cost_model


def usage_unknown(judged: list[TenantResult], statuses: Mapping[str, TenantDatabaseStatus], now: dt.datetime,
                  exc: Exception) -> None:
    """The month's usage could not be read: each tenant's last verdict holds (restrictions keep
    applying, the over-since date stays) and its UsageWithinPlan condition says why."""
    why = describe_error(exc)
    log.warning("proxy usage unavailable; last verdicts hold", extra={"error": why, "tenants": len(judged)})
    for result in judged:
        assert result.limits is not None
        previous = statuses.get(result.key)
        result.overage = carried_overage(result.limits.billing, previous.usage if previous else None, now, why)


@dataclass
class UsageRollup:
    """Copies the proxies' hourly usage into dynabase.tenantUsage (idempotent upserts)."""

    every: float = 60.0  # seconds between the copies reconcile passes make
    last: float = 0.0  # time.monotonic() of the last copy

    def due(self) -> bool:
        return time.monotonic() - self.last > self.every

    async def copy(self, proxy: ProxyBackend, mongo: MongoBackend, hours: int = 2) -> int:
        self.last = time.monotonic()
        written = 0
        current = int(time.time() // 3600)
        with contextlib.suppress(Exception):
            for hour in range(current - hours + 1, current + 1):
                fields = await proxy.usage_fields(hour)
                if fields:
                    written += await mongo.write_usage(hour, fields)
        return written
