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


_restricted_labels: dict[str, tuple[str, str, str]] = {}
_usage_labels: dict[str, tuple[str, str]] = {}


def set_usage_ratio(tenant: str, tier: str, ratio: float | None) -> None:
    """One series per tenant (partial passes only touch their own tenants); a tier change moves it."""
    labels = (tenant, tier)
    old = _usage_labels.get(tenant)
    if old is not None and (old != labels or ratio is None):
        USAGE_LEVEL.remove(*old)
        del _usage_labels[tenant]
    if ratio is not None:
        USAGE_LEVEL.labels(*labels).set(ratio)
        _usage_labels[tenant] = labels


def set_restricted(tenant: str, tier: str, restriction: str | None) -> None:
    """One series per restricted tenant; the old series goes when the restriction changes or lifts."""
    labels = (tenant, tier, restriction) if restriction else None
    old = _restricted_labels.get(tenant)
    if old is not None and old != labels:
        USAGE_RESTRICTED.remove(*old)
        del _restricted_labels[tenant]
    if labels is not None:
        USAGE_RESTRICTED.labels(*labels).set(1)
        _restricted_labels[tenant] = labels
