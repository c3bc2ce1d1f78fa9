"""What the proxy enforces per tenant, as published by the engine, and whose QPS budget a
tenant draws on. Pure.

The engine writes one entry per tenant database to Redis and every proxy replica
keeps a copy (names and JSON: dynabase.keyspace). Each replica works out the QPS
budgets from its copy (``qps_budgets``), so all replicas agree without the engine
having to see every database of an organization in each pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .effective import EffectiveLimits


@dataclass(frozen=True)
class ProxyTenantLimits:
    tenant: str  # namespace/name, for messages and metering
    database: str
    role: str
    tier: str
    pool: str
    max_connections: int
    qps: int | None  # None: unlimited
    burst: int | None  # set whenever qps is (the effective limits default it to qps)
    queue_timeout_ms: int
    over_limit: str
    statement_timeout_ms: int | None
    idle_in_transaction_ms: int | None
    enabled: bool = True
    cold: bool = False  # scaled to zero: the next connection announces a wake-up
    # Who shares the qps budget (tier field proxy.qpsScope). Entries an older engine published
    # have neither, and keep the budget per database as it was then.
    org_id: str | None = None
    qps_scope: str = "database"

    def __post_init__(self) -> None:
        if self.qps is not None and self.burst is None:
            raise ValueError(f"proxy limits for {self.database}: qps {self.qps} without a burst; "
                             "effective limits default burst to qps, so publish those")


def proxy_limits(tenant_key: str, database: str, pool: str, limits: EffectiveLimits,
                 *, enabled: bool = True, cold: bool = False, org_id: str | None = None) -> ProxyTenantLimits:
    pg, proxy = limits.postgres, limits.proxy
    return ProxyTenantLimits(
        tenant=tenant_key, database=database, role=database, tier=limits.tier, pool=pool,
        max_connections=proxy.max_connections, qps=proxy.qps, burst=proxy.burst,
        queue_timeout_ms=proxy.queue_timeout.milliseconds, over_limit=proxy.over_limit,
        statement_timeout_ms=pg.statement_timeout.milliseconds if pg.statement_timeout else None,
        idle_in_transaction_ms=(
            pg.idle_in_transaction_session_timeout.milliseconds if pg.idle_in_transaction_session_timeout else None
        ),
        enabled=enabled,
        cold=cold,
        org_id=org_id,
        qps_scope=proxy.qps_scope,
    )


def plan_lines(old: ProxyTenantLimits | None, new: ProxyTenantLimits | None) -> list[str]:
    if old == new:
        return []
    if new is None:
        return ["remove proxy limits"]
    if old is not None and old.cold != new.cold and replace(old, cold=new.cold) == new:
        return ["proxy: mark Cold (wake on next connection)" if new.cold else "proxy: mark awake"]
    qps = "unlimited" if new.qps is None else f"{new.qps}/s burst {new.burst}"
    if new.qps is not None and budget_owner(new) != new.database:
        qps += f" shared by organization {new.org_id}"
    return [f"proxy limits: {new.max_connections} connections, {qps} ({new.over_limit}), "
            f"statement timeout {new.statement_timeout_ms or 'none'} ms"]


def restricted(limits: ProxyTenantLimits, restriction: str | None, restricted_qps: int) -> ProxyTenantLimits:
    """A tenant restricted to a lower rate (over its included usage) gets at most ``restricted_qps``,
    on a budget of its own: the restriction is its usage's, not its organization's."""
    if restriction != "qps":
        return limits
    qps = restricted_qps if limits.qps is None else min(limits.qps, restricted_qps)
    return replace(limits, qps=qps, burst=qps, qps_scope="database")


def lowers(before: ProxyTenantLimits | None, after: ProxyTenantLimits) -> bool:
    """Whether publishing ``after`` lowers the connections or rate the proxy allows (None: unlimited)."""
    if before is None:
        return False

    def qps(value: int | None) -> float:
        return float("inf") if value is None else value
    return after.max_connections < before.max_connections or qps(after.qps) < qps(before.qps)


# -- QPS budgets ---------------------------------------------------------------------------------

ORG_BUDGET = "org:"  # prefix of an organization's budget owner; database names cannot hold a ':'


@dataclass(frozen=True)
class QpsBudget:
    """One QPS budget, shared by all proxy replicas: a database's own, or its organization's
    (every organization-scoped database with that orgId draws on it)."""

    owner: str  # the database, or ORG_BUDGET + orgId
    qps: int
    burst: int
    queue_timeout_ms: int
    over_limit: str
    tier: str  # the tier these limits are from
    source: str  # the database whose limits these are
    org_id: str | None = None  # set on an organization's budget
    uneven: bool = False  # the organization's databases have different QPS limits

    @classmethod
    def of(cls, limits: ProxyTenantLimits, owner: str | None = None) -> QpsBudget:
        assert limits.qps is not None and limits.burst is not None
        return cls(owner or limits.database, limits.qps, limits.burst, limits.queue_timeout_ms, limits.over_limit,
                   limits.tier, limits.database, limits.org_id if owner else None)

    def describe(self) -> str:
        whose = f"organization {self.org_id}" if self.org_id else f"tenant database {self.source}"
        return f"{whose}: tier {self.tier} allows {self.qps} queries per second (burst {self.burst})"


def budget_owner(limits: ProxyTenantLimits) -> str:
    """Whose budget a database's queries count against: its organization's, or its own."""
    if limits.qps_scope == "organization" and limits.org_id:
        return ORG_BUDGET + limits.org_id
    return limits.database


def _generosity(limits: ProxyTenantLimits) -> tuple[int, int, int, bool]:
    assert limits.qps is not None and limits.burst is not None
    return limits.qps, limits.burst, limits.queue_timeout_ms, limits.over_limit == "throttle"


def qps_budgets(table: Mapping[str, ProxyTenantLimits]) -> dict[str, QpsBudget]:
    """The budget of every database with a QPS limit (unlimited ones have none).

    An organization's budget is the limits of its most generous limited database: the highest
    qps, then burst, then queueTimeout, throttle before reject (on a tie, the first database by
    name), taken whole from that database so they stay one tier's settings. The databases of an
    organization share its tier (the billing subscription is per organization), so this is that
    tier's limit; while they differ (a downgrade waiting out its grace period on one, an
    override) the organization keeps the most generous, never the sum, and ``uneven`` says so.
    A database that must keep its own rate sets ``proxy.qpsScope: database`` in its overrides;
    a database whose tier is unlimited stays unlimited and draws on no budget."""
    members: dict[str, list[ProxyTenantLimits]] = {}
    for database in sorted(table):
        limits = table[database]
        if limits.qps is not None:
            members.setdefault(budget_owner(limits), []).append(limits)
    budgets: dict[str, QpsBudget] = {}
    for owner, group in members.items():
        if owner == group[0].database:
            budgets[owner] = QpsBudget.of(group[0])
            continue
        budget = QpsBudget.of(max(group, key=_generosity), owner)
        if len({_generosity(m) for m in group}) > 1:
            budget = replace(budget, uneven=True)
        for limits in group:
            budgets[limits.database] = budget
    return budgets
