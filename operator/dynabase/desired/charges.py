"""What a tenant owes for a month, prorated by the tiers it was on. Pure.

A month is split by tier. ``status.history`` (TierChange from/to/at) gives the
hours the tenant spent on each tier: each tier's base fee and included
vCPU-hours count for that share of the month. Usage is attributed hour by hour
to the tier the proxies recorded with that hour's counters. Each tier's part is
then priced on its own — its usage against its prorated included hours, the
excess at its own overage price — so an upgrade never reprices the hours
before it, and a downgrade never makes the earlier, larger allowance cover the
later usage.

The report, the billing close and the engine's judgment all turn usage into
vCPU-hours with the same ``FittedModel``; this module decides only how a month
is cut and priced.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.tenant import TierChange

from .cost import Estimate, FittedModel, UsageTotals
from .effective import BillingEffective, ResolveError, effective_limits, merge

DEFAULT_POLICY = "default"
MONTH_PATTERN = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
SECONDS_PER_HOUR = 3600.0


def month_bounds(month: str) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a YYYY-MM month in UTC; ValueError names the value and the form."""
    matched = MONTH_PATTERN.match(month)
    if not matched:
        raise ValueError(f"month {month!r}: expected YYYY-MM, for example 2026-10")
    year, number = int(matched[1]), int(matched[2])
    return (dt.datetime(year, number, 1, tzinfo=dt.UTC),
            dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=dt.UTC))


def month_hours(month: str) -> range:
    """The month's hours as the proxy numbers them (UTC hours since the epoch)."""
    start, end = month_bounds(month)
    return range(int(start.timestamp()) // 3600, int(end.timestamp()) // 3600)


def previous_month(now: dt.datetime) -> str:
    first = now.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - dt.timedelta(days=1)).strftime("%Y-%m")


def usd_cents(amount_usd: float) -> int:
    """Whole cents, half up: the one rounding the report and the invoice share."""
    return int((Decimal(repr(amount_usd)) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# -- hours on each tier -------------------------------------------------------------------------


def tier_at(history: Sequence[TierChange], at: dt.datetime, fallback: str | None) -> str | None:
    """The tier applied at ``at``: the last change before it, else the first change's
    starting tier (None: the tenant did not exist yet), else ``fallback`` (no history)."""
    changes = sorted(history, key=lambda change: change.at)
    before = [change for change in changes if change.at <= at]
    if before:
        return before[-1].to_tier
    return changes[0].from_tier if changes else fallback


def tier_hours(history: Sequence[TierChange], fallback: str | None, start: dt.datetime,
               end: dt.datetime) -> dict[str, float]:
    """Hours on each tier within [start, end). A tenant created during the month
    (its first change comes from no tier) has no hours before it was created."""
    hours: dict[str, float] = {}
    tier, cursor = tier_at(history, start, fallback), start
    for change in sorted((c for c in history if start < c.at < end), key=lambda c: c.at):
        if tier is not None:
            hours[tier] = hours.get(tier, 0.0) + (change.at - cursor).total_seconds() / SECONDS_PER_HOUR
        tier, cursor = change.to_tier, change.at
    if tier is not None:
        hours[tier] = hours.get(tier, 0.0) + (end - cursor).total_seconds() / SECONDS_PER_HOUR
    return {name: value for name, value in hours.items() if value > 0}


# -- usage on each tier -------------------------------------------------------------------------


def _number(doc: Mapping[str, object], key: str) -> float:
    value = doc.get(key, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass(frozen=True)
class MeteredHour:
    tenant: str
    hour: int  # UTC hours since the epoch
    tier: str | None  # as the proxies recorded it; None in counters older than the field
    usage: UsageTotals


def metered_hours(rollups: Sequence[Mapping[str, object]]) -> list[MeteredHour]:
    """Hourly rollup documents (``dynabase.desired.mongo.rollup``, or tenantUsage)."""
    out = []
    for doc in rollups:
        tier = doc.get("tier")
        out.append(MeteredHour(str(doc["tenant"]), int(_number(doc, "hour")), str(tier) if tier else None,
                               UsageTotals(_number(doc, "queries"), _number(doc, "query_seconds"),
                                           _number(doc, "connections"))))
    return out


def usage_by_tier(hours: Sequence[MeteredHour], history: Sequence[TierChange],
                  fallback: str | None) -> dict[str, UsageTotals]:
    """One tenant's metered hours summed per tier; an hour without a recorded tier goes
    to the tier the history says was applied then."""
    out: dict[str, UsageTotals] = {}
    for metered in hours:
        at = dt.datetime.fromtimestamp(metered.hour * SECONDS_PER_HOUR, dt.UTC)
        tier = metered.tier or tier_at(history, at, fallback) or fallback or "?"
        out[tier] = out.get(tier, UsageTotals()) + metered.usage
    return out


# -- pricing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierPart:
    """One tier's share of a tenant's month."""

    tier: str
    hours: float  # on this tier
    share: float  # hours / hours in the month
    usage: UsageTotals  # metered while on this tier
    vcpu_hours: float
    included_vcpu_hours: float  # the tier's, times share
    base_fee_usd: float  # the tier's, times share
    overage_price_usd: float | None  # None: the tier sells no overage
    overage_vcpu_hours: float
    overage_usd: float


@dataclass(frozen=True)
class TenantMonth:
    tenant: str
    org_id: str | None
    tier: str  # at the end of the month (or its last recorded hour)
    parts: tuple[TierPart, ...]
    estimate: Estimate  # of the whole month's usage: CPU and memory, for calibration and cost

    @property
    def usage(self) -> UsageTotals:
        total = UsageTotals()
        for part in self.parts:
            total = total + part.usage
        return total

    @property
    def vcpu_hours(self) -> float:
        return sum(part.vcpu_hours for part in self.parts)

    @property
    def included_vcpu_hours(self) -> float:
        return sum(part.included_vcpu_hours for part in self.parts)

    @property
    def overage_vcpu_hours(self) -> float:
        return sum(part.overage_vcpu_hours for part in self.parts)

    @property
    def base_fee_usd(self) -> float:
        return sum(part.base_fee_usd for part in self.parts)

    @property
    def overage_usd(self) -> float:
        return sum(part.overage_usd for part in self.parts)

    @property
    def overage_cents(self) -> int:
        """What the invoice item charges."""
        return usd_cents(self.overage_usd)


def price_tenant_month(tenant: str, org_id: str | None, tier: str, hours_on: Mapping[str, float],
                       usage_on: Mapping[str, UsageTotals], billing_of: Mapping[str, BillingEffective],
                       month_hours: float, model: FittedModel) -> TenantMonth:
    """``hours_on`` / ``usage_on``: per tier; ``billing_of`` has every tier of either."""
    parts = []
    for name in sorted(set(hours_on) | set(usage_on), key=lambda t: (-hours_on.get(t, 0.0), t)):
        billing, hours = billing_of[name], hours_on.get(name, 0.0)
        share = hours / month_hours if month_hours > 0 else 0.0
        usage = usage_on.get(name, UsageTotals())
        used = model.vcpu_hours(tenant, usage)
        included = billing.included_vcpu_hours * share
        over = max(0.0, used - included)
        price = billing.overage_per_vcpu_hour_usd
        parts.append(TierPart(
            tier=name, hours=hours, share=share, usage=usage, vcpu_hours=used, included_vcpu_hours=included,
            base_fee_usd=billing.base_fee_usd * share, overage_price_usd=price, overage_vcpu_hours=over,
            overage_usd=over * price if price is not None else 0.0,  # no price: overage not sold
        ))
    total = UsageTotals()
    for part in parts:
        total = total + part.usage
    return TenantMonth(tenant, org_id, tier, tuple(parts), model.estimate(tenant, total))


@dataclass(frozen=True)
class MonthPricing:
    """Every tenant's month, priced with one model version."""

    month: str
    tenants: tuple[TenantMonth, ...]
    model: FittedModel
    source: str  # where the usage came from
    notes: tuple[str, ...] = ()

    def tenant(self, key: str) -> TenantMonth:
        return next(t for t in self.tenants if t.tenant == key)


# -- a whole month ------------------------------------------------------------------------------


class _Billings:
    """Each (tenant, tier)'s billing section: the tier with the tenant's overrides."""

    def __init__(self, policies: Mapping[str, TierPolicy]) -> None:
        self.policies = policies
        self.fallback = policies.get(DEFAULT_POLICY) or (
            next(iter(policies.values())) if len(policies) == 1 else None)
        self.notes: list[str] = []

    def _bare(self, policy: TierPolicy | None, tier: str) -> BillingEffective | None:
        if policy is None or tier not in policy.spec.tiers:
            return None
        found = policy.spec.tiers[tier]
        return merge(tier, found.rank, [found]).billing

    def of(self, key: str, tenant: TenantDatabase | None, tier: str) -> BillingEffective:
        if tenant is None:  # metered, no longer declared: the tier as the default policy prices it
            billing = self._bare(self.fallback, tier)
            if billing is not None:
                self.notes.append(f"{key}: metered but not declared; priced as tier {tier}")
                return billing
        else:
            policy = self.policies.get(tenant.spec.tier_policy_ref)
            if policy is not None:
                name = tier if tier in policy.spec.tiers else tenant.spec.tier
                if name != tier:
                    self.notes.append(f"{key}: tier {tier} is no longer in TierPolicy {policy.name}; "
                                      f"its hours priced as {name}")
                try:
                    return effective_limits(tenant, policy, name).billing
                except ResolveError as exc:
                    self.notes.append(f"{key}: {exc.message}")
        self.notes.append(f"{key}: tier '{tier}' not found in the manifests; priced at the defaults")
        return BillingEffective()


def completed_history(history: Sequence[TierChange], hours: Sequence[MeteredHour]) -> list[TierChange]:
    """A creation (a change from no tier) later than the tenant's first metered hour is not when
    it began — its status was lost, or first written later: before it, the tenant was on the tier
    that earliest hour recorded."""
    changes = sorted(history, key=lambda change: change.at)
    if not changes or changes[0].from_tier is not None or not hours:
        return changes
    earliest = min(hours, key=lambda h: h.hour)
    if earliest.hour * SECONDS_PER_HOUR >= changes[0].at.timestamp():
        return changes
    began = changes[0].model_copy(update={"from_tier": earliest.tier or changes[0].to_tier})
    return [began, *changes[1:]]


def price_month(month: str, policies: Mapping[str, TierPolicy], tenants: Sequence[TenantDatabase],
                statuses: Mapping[str, TenantDatabaseStatus], rollups: Sequence[Mapping[str, object]],
                model: FittedModel, source: str) -> MonthPricing:
    """Every declared tenant (it pays its base fee without usage) and every metered one.

    Hours per tier from each tenant's status history; without history, the whole
    month on its applied tier (else its last recorded tier, else the declared one).
    A metered tenant no longer declared is priced for the whole month by its last
    recorded tier in the "default" (or only) TierPolicy.
    """
    start, end = month_bounds(month)
    total_hours = (end - start).total_seconds() / SECONDS_PER_HOUR
    metered: dict[str, list[MeteredHour]] = {}
    for hour in metered_hours(rollups):
        metered.setdefault(hour.tenant, []).append(hour)
    declared = {t.key: t for t in tenants}
    billings = _Billings(policies)
    priced = []
    for key in sorted(set(declared) | set(metered)):
        tenant, hours = declared.get(key), sorted(metered.get(key, []), key=lambda h: h.hour)
        status = statuses.get(key) or (tenant.status if tenant is not None else None)
        history = completed_history(status.history if status is not None else [], hours)
        recorded = next((h.tier for h in reversed(hours) if h.tier), None)
        fallback = (status.applied_tier if status is not None else None) or recorded or (
            tenant.spec.tier if tenant is not None else None)
        on_tier = tier_hours(history, fallback, start, end) if tenant is not None else {}
        if tenant is None and fallback is not None:
            on_tier = {fallback: total_hours}
        usage = usage_by_tier(hours, history, fallback)
        billing_of = {tier: billings.of(key, tenant, tier) for tier in set(on_tier) | set(usage)}
        at_end = tier_at(history, end, fallback) if history else fallback
        priced.append(price_tenant_month(key, tenant.spec.org_id if tenant is not None else None,
                                         at_end or "?", on_tier, usage, billing_of, total_hours, model))
    return MonthPricing(month, tuple(priced), model, source, tuple(dict.fromkeys(billings.notes)))
