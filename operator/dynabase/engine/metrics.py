"""Prometheus metrics of the engine (shared by the operator and headless mode)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "dynabase_reconcile_duration_seconds", "Wall time of one reconcile pass.", ["mode"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BACKEND_ERRORS = Counter(
    "dynabase_backend_errors_total", "Tenants whose backend condition was False after a pass.", ["backend", "reason"]
)
DRIFT_CORRECTIONS = Counter(
    "dynabase_drift_corrections_total", "Changes written although the declaration had not changed.", ["backend"]
)
REDIS_DEMOTIONS = Counter(
    "dynabase_redis_quota_demotions_total", "Tenants made read-only in Redis for going over their quota."
)
STATEMENTS = Counter("dynabase_postgres_statements_total", "Statements the engine wrote to Postgres.")
SESSIONS_ENDED = Counter(
    "dynabase_sessions_ended_total", "Postgres sessions the engine ended, by why: over_limit (a lowered "
    "connection limit drained) or cold (idle sessions of a tenant scaled to zero).", ["reason"]
)
COLD_TRANSITIONS = Counter(
    "dynabase_cold_transitions_total", "Tenants that went Cold (scaled to zero) or woke up again.", ["direction"]
)
USAGE_RESTRICTED = Gauge(
    "dynabase_usage_restricted", "1 while a tenant over its included usage is restricted (soft overage ended).",
    ["tenant", "tier", "restriction"],
)
USAGE_LEVEL = Gauge(
    "dynabase_usage_month_ratio", "Month-to-date estimated vCPU-hours over the tier's included vCPU-hours.",
    ["tenant", "tier"],
)
USAGE_THRESHOLDS = Counter(
    "dynabase_usage_threshold_events_total",
    "Tenants crossing 80 % or 100 % of their included vCPU-hours this month (one Event each).",
    ["tier", "level"],
)
TENANT_TIER = Gauge(
    "dynabase_tenant_tier", "The rank of each tenant's applied tier (labelled with its name).", ["tenant", "tier"]
)
TIER_CHANGES = Counter(
    "dynabase_tenant_tier_changes_total",
    "Tier changes applied to a tenant: promotion (a higher rank), demotion (lower, after its grace period) "
    "or lateral (the same rank, or its old tier left the policy).", ["tenant", "direction"],
)
LIMIT_HITS = Counter(
    "dynabase_limit_hits_total", "Times a tenant hit a tier limit the engine enforces, by kind: redis_quota (made "
    "read-only over its Redis keys or memory). The proxy's kinds: dynabase_proxy_limit_hits_total.",
    ["tenant", "kind"],
)
TENANT_READY = Gauge(
    "dynabase_tenant_ready_timestamp_seconds",
    "When the tenant last became Ready (Unix time); time() minus it is its uptime. No series while not Ready.",
    ["tenant"],
)
TENANTS = Gauge("dynabase_tenants", "Tenants by applied tier and phase.", ["tier", "phase"])
PENDING_DOWNGRADES = Gauge("dynabase_pending_downgrades", "Tenants waiting out a downgrade grace period.")

_BACKEND_OF = {
    "PostgresReady": "postgres", "PgBouncerReady": "pgbouncer", "RedisReady": "redis",
    "MongoReady": "mongo", "RailwayReady": "railway", "ProxyReady": "proxy",
}


def backend_of(condition_type: str) -> str:
    return _BACKEND_OF.get(condition_type, condition_type)


def set_tenant_gauges(counts: Tally[tuple[str, str]], pending: int) -> None:
    TENANTS.clear()
    for (tier, phase), n in counts.items():
        TENANTS.labels(tier=tier, phase=phase).set(n)
    PENDING_DOWNGRADES.set(pending)


class PerTenant:
    """One series of a labelled metric per tenant: labels that change (a tier change) move it, and
    ``forget`` removes it, so series stay bounded by the tenants there are. Tenant first in labels."""

    def __init__(self, metric: Gauge | Counter) -> None:
        self.metric = metric
        self.labels: dict[str, tuple[str, ...]] = {}

    def set(self, tenant: str, labels: tuple[str, ...], value: float | None) -> None:
        old = self.labels.get(tenant)
        if old is not None and (old != labels or value is None):
            self.metric.remove(*old)
            del self.labels[tenant]
        if value is not None:
            assert isinstance(self.metric, Gauge)
            self.metric.labels(*labels).set(value)
            self.labels[tenant] = labels

    def forget(self, tenant: str) -> None:
        self.set(tenant, (), None)


class PerTenantCounts:
    """Counters with a few series per tenant (one per value of the other label), removed with it."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.values: dict[str, set[str]] = {}

    def inc(self, tenant: str, value: str) -> None:
        self.counter.labels(tenant, value).inc()
        self.values.setdefault(tenant, set()).add(value)

    def start(self, tenant: str, values: tuple[str, ...]) -> None:
        """Series at 0 before the first event: Prometheus' increase() cannot see the first
        increment of a series that is born at 1."""
        if tenant not in self.values:
            for value in values:
                self.counter.labels(tenant, value)
            self.values[tenant] = set(values)

    def forget(self, tenant: str) -> None:
        for value in self.values.pop(tenant, ()):
            self.counter.remove(tenant, value)


_usage = PerTenant(USAGE_LEVEL)
_restricted = PerTenant(USAGE_RESTRICTED)
_tier = PerTenant(TENANT_TIER)
_ready = PerTenant(TENANT_READY)
_tier_changes = PerTenantCounts(TIER_CHANGES)
_limit_hits = PerTenantCounts(LIMIT_HITS)


def set_usage_ratio(tenant: str, tier: str, ratio: float | None) -> None:
    """One series per tenant (partial passes only touch their own tenants); a tier change moves it."""
    _usage.set(tenant, (tenant, tier), ratio)


def set_restricted(tenant: str, tier: str, restriction: str | None) -> None:
    """One series per restricted tenant; the old series goes when the restriction changes or lifts."""
    _restricted.set(tenant, (tenant, tier, restriction or ""), 1 if restriction else None)


def set_tier(tenant: str, tier: str, rank: int) -> None:
    _tier.set(tenant, (tenant, tier), rank)
    _tier_changes.start(tenant, ("promotion", "demotion"))


def set_ready_since(tenant: str, since: float | None) -> None:
    """Unix time the tenant became Ready; None while it is not."""
    _ready.set(tenant, (tenant,), since)


def tier_changed(tenant: str, change: str) -> None:
    """An applied tier change, as desired.transition decided it (upgrade, downgrade, lateral)."""
    direction = {"upgrade": "promotion", "downgrade": "demotion"}.get(change, "lateral")
    _tier_changes.inc(tenant, direction)


def limit_hit(tenant: str, kind: str) -> None:
    _limit_hits.inc(tenant, kind)


def forget_tenant(tenant: str) -> None:
    """A deleted tenant leaves no series behind."""
    for series in (_usage, _restricted, _tier, _ready, _tier_changes, _limit_hits):
        series.forget(tenant)
