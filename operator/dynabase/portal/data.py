"""What a tenant's page shows, gathered from the declarations, the status, the metered usage, the
stored cost model and the event log: the same sources the engine, the report and the close read."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from dynabase.backends.events_pg import PostgresEventLog, StoredEvent
from dynabase.desired.cost import FittedModel, UsageTotals
from dynabase.desired.effective import EffectiveLimits, ResolveError, effective_limits
from dynabase.desired.overage import month_of
from dynabase.desired.projection import LIMIT_HITS, Projection, counter_total, daily_vcpu_hours, project_month
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.limit import LimitField
from dynabase.spec.limits import FIELDS
from dynabase.spec.units import ByteSize, Duration

from .usage import MonthDocs

log = logging.getLogger(__name__)
Declared = tuple[Mapping[str, TierPolicy], Sequence[TenantDatabase]]
# The sections a tenant reads, in the order it cares about them; railway only for a tenant with a service.
SECTIONS = ("billing", "proxy", "postgres", "redis", "mongo", "lifecycle", "pgbouncer", "railway")


class Declarations(Protocol):
    """Where the portal finds tenants, tiers and status (headless state, manifests, the cluster)."""

    async def declared(self) -> Declared: ...

    async def statuses(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]: ...


class Models(Protocol):
    async def in_force(self, at: dt.datetime | None = None) -> FittedModel: ...


@dataclass(frozen=True)
class LimitRow:
    section: str
    label: str
    description: str
    current: str
    next: str | None  # on the next tier; None without one
    changed: bool


@dataclass(frozen=True)
class TenantPage:
    tenant: TenantDatabase
    status: TenantDatabaseStatus | None
    tier: str
    next_tier: str | None
    month: str
    as_of: dt.datetime
    limits: list[LimitRow]
    events: list[StoredEvent]
    projection: Projection | None = None  # None: no usage source, or it could not be read
    daily_vcpu_hours: list[float] = field(default_factory=list)
    usage: UsageTotals = field(default_factory=UsageTotals)
    hits: dict[str, tuple[int, int]] = field(default_factory=dict)  # counter -> (this month, today)
    usage_error: str | None = None


def find_tenant(tenants: Sequence[TenantDatabase], *, key: str | None = None,
                database: str | None = None) -> TenantDatabase | None:
    return next((t for t in tenants if (key is None or t.key == key)
                 and (database is None or t.database_name == database)), None)


def next_tier(policy: TierPolicy, tier: str) -> str | None:
    """The tier of the next rank up in the tenant's TierPolicy: what an upgrade would give."""
    rank = policy.spec.tiers[tier].rank
    higher = sorted((t.rank, name) for name, t in policy.spec.tiers.items() if t.rank > rank)
    return higher[0][1] if higher else None


def label(declared: LimitField) -> str:
    """The limit's name for a tenant: its review label, else its manifest name in words."""
    if declared.limit.review:
        return declared.limit.review
    words = re.findall(r"[A-Z]{2,}(?![a-z])|[A-Z]?[a-z]+|\d+", declared.alias)
    return " ".join(w if w.isupper() else w.lower() for w in words).replace("vcpu", "vCPU")


def show(declared: LimitField, value: object) -> str:
    """A limit as a tenant reads it; an absent one as its declaration explains absence ("never", …)."""
    if declared.is_unlimited(value):
        return "unlimited"
    if value is None:
        absent = re.match(r"Absent = (.+?)\.?$", declared.limit.absent or "")
        return absent.group(1) if absent else "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if declared.alias.endswith("USD") and isinstance(value, int | float):
        return f"${value:,.2f}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Duration | ByteSize):
        return value.text
    return str(value)


def limit_rows(tenant: TenantDatabase, current: EffectiveLimits, upgrade: EffectiveLimits | None) -> list[LimitRow]:
    """Every declared limit of the tenant's tier beside the next tier's, from ``spec.limits``."""
    rows = []
    for section in SECTIONS:
        if section == "railway" and tenant.spec.railway is None:
            continue
        for declared in FIELDS[section]:
            values = [declared.read(current)] + ([declared.read(upgrade)] if upgrade is not None else [])
            if all(v is None for v in values) and not declared.is_unlimited(None):
                continue  # set on neither tier, and absence means nothing to a tenant (no warning, not set)
            now = show(declared, values[0])
            then = show(declared, values[1]) if upgrade is not None else None
            rows.append(LimitRow(section, label(declared), declared.limit.description, now, then,
                                 then is not None and then != now))
    return rows


async def tenant_page(tenant: TenantDatabase, policies: Mapping[str, TierPolicy], status: TenantDatabaseStatus | None,
                      *, events: PostgresEventLog | None, month_docs: MonthDocs | None, models: Models | None,
                      now: dt.datetime, event_count: int = 20) -> TenantPage:
    policy = policies.get(tenant.spec.tier_policy_ref)
    if policy is None:
        raise ResolveError("TierPolicyNotFound", f"TierPolicy {tenant.spec.tier_policy_ref!r} is not declared")
    tier = (status.applied_tier if status is not None else None) or tenant.spec.tier
    if tier not in policy.spec.tiers:
        tier = tenant.spec.tier
    upgrade = next_tier(policy, tier)
    current = effective_limits(tenant, policy, tier)
    try:
        upgrade_limits = effective_limits(tenant, policy, upgrade) if upgrade is not None else None
    except ResolveError:  # the overrides do not fit the next tier: no prompt rather than a wrong one
        upgrade, upgrade_limits = None, None
    month = month_of(now)
    page = TenantPage(tenant, status, tier, upgrade, month, now, limit_rows(tenant, current, upgrade_limits),
                      await events.recent(tenant=tenant.key, limit=event_count) if events is not None else [])
    if month_docs is None:
        return page
    try:
        docs = await month_docs.of(tenant.key, month, now)
        model = await models.in_force() if models is not None else FittedModel()
    except (OSError, asyncpg.PostgresError) as exc:
        log.warning("portal: usage unavailable", extra={"tenant": tenant.key, "error": str(exc)})
        return dataclasses.replace(page, usage_error=f"usage cannot be read right now ({type(exc).__name__})")
    projection = project_month(month, policies, tenant, status, docs, model, now, upgrade)
    today = int(now.timestamp()) // 3600
    today -= today % 24
    hits = {name: (round(counter_total(docs, name)), round(counter_total(docs, name, since_hour=today)))
            for name in LIMIT_HITS}
    return dataclasses.replace(page, projection=projection, usage=projection.to_date.usage, hits=hits,
                               daily_vcpu_hours=daily_vcpu_hours(docs, model, tenant.key, month))


