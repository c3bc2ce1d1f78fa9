"""Effective limits: the tier from the referenced TierPolicy, the tenant's
overrides merged field by field on top, and documented defaults beneath both."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from dynabase.spec import TenantDatabase, TierLimits, TierPolicy
from dynabase.spec.tier import POOL_FITS_MESSAGE
from dynabase.spec.units import ByteSize, Duration

SECTIONS = ("postgres", "pgbouncer", "proxy", "redis", "mongo", "lifecycle", "railway", "billing")

# The one table of defaults; field descriptions in dynabase.spec.tier say the same.
DEFAULTS: dict[str, dict[str, Any]] = {
    "postgres": {
        "connection_limit": 10,
        "statement_timeout": None,
        "idle_in_transaction_session_timeout": None,
        "idle_session_timeout": None,
        "work_mem": None,
        "temp_buffers": None,
        "temp_file_limit": None,
    },
    "pgbouncer": {
        "pool_size": 5,
        "reserve_pool_size": 0,
        "max_db_connections": 0,
        "max_user_connections": 0,
        "pool_mode": "transaction",
    },
    "proxy": {
        "max_connections": 100,
        "qps": None,
        "burst": None,
        "queue_timeout": Duration.of_ms(1000),
        "over_limit": "throttle",
    },
    "redis": {"max_memory": None, "max_keys": None},
    "mongo": {"max_connections": None},
    "lifecycle": {"idle_timeout": None, "downgrade_grace_period": Duration.of_ms(15 * 60_000)},
    "railway": {
        "replicas": 1, "sleep_application": False, "v_cpus": None, "memory_gb": None,
        "restart_policy": None, "restart_policy_max_retries": None,
    },
    "billing": {
        "base_fee_usd": 0.0, "included_vcpu_hours": 0.0, "overage_per_vcpu_hour_usd": None,
        "soft_overage_period": Duration.of_ms(7 * 86_400_000), "overage_restriction": "qps", "restricted_qps": 1,
    },
}


class ResolveError(ValueError):
    """The tenant's declaration cannot be resolved; the message says what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PostgresEffective:
    connection_limit: int
    statement_timeout: Duration | None
    idle_in_transaction_session_timeout: Duration | None
    idle_session_timeout: Duration | None
    work_mem: ByteSize | None
    temp_buffers: ByteSize | None
    temp_file_limit: ByteSize | None


@dataclass(frozen=True)
class PgBouncerEffective:
    pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    max_user_connections: int
    pool_mode: str


@dataclass(frozen=True)
class ProxyEffective:
    max_connections: int
    qps: int | None
    burst: int | None
    queue_timeout: Duration
    over_limit: str


@dataclass(frozen=True)
class RedisEffective:
    max_memory: ByteSize | None
    max_keys: int | None


@dataclass(frozen=True)
class MongoEffective:
    max_connections: int | None


@dataclass(frozen=True)
class LifecycleEffective:
    idle_timeout: Duration | None
    downgrade_grace_period: Duration


@dataclass(frozen=True)
class RailwayEffective:
    replicas: int
    sleep_application: bool
    v_cpus: float | None
    memory_gb: float | None
    restart_policy: str | None
    restart_policy_max_retries: int | None


@dataclass(frozen=True)
class BillingEffective:
    base_fee_usd: float
    included_vcpu_hours: float
    overage_per_vcpu_hour_usd: float | None
    soft_overage_period: Duration
    overage_restriction: str
    restricted_qps: int


@dataclass(frozen=True)
class EffectiveLimits:
    tier: str
    rank: int
    postgres: PostgresEffective
    pgbouncer: PgBouncerEffective
    proxy: ProxyEffective
    redis: RedisEffective
    mongo: MongoEffective
    lifecycle: LifecycleEffective
    railway: RailwayEffective
    billing: BillingEffective


_SECTION_TYPES: dict[str, type] = {
    "postgres": PostgresEffective,
    "pgbouncer": PgBouncerEffective,
    "proxy": ProxyEffective,
    "redis": RedisEffective,
    "mongo": MongoEffective,
    "lifecycle": LifecycleEffective,
    "railway": RailwayEffective,
    "billing": BillingEffective,
}


def _declared(limits: TierLimits | None, section: str) -> dict[str, Any]:
    if limits is None:
        return {}
    model = getattr(limits, section)
    if model is None:
        return {}
    return {name: getattr(model, name) for name in type(model).model_fields if getattr(model, name) is not None}


def merge(tier_name: str, rank: int, layers: list[TierLimits | None]) -> EffectiveLimits:
    """Later layers win field by field; defaults fill what no layer declares."""
    sections: dict[str, Any] = {}
    for section in SECTIONS:
        values = dict(DEFAULTS[section])
        for layer in layers:
            values.update(_declared(layer, section))
        sections[section] = _SECTION_TYPES[section](**values)
    proxy: ProxyEffective = sections["proxy"]
    if proxy.qps is not None and proxy.burst is None:
        sections["proxy"] = ProxyEffective(**{**vars(proxy), "burst": proxy.qps})
    limits = EffectiveLimits(tier=tier_name, rank=rank, **sections)
    _check(limits)
    return limits


def _check(limits: EffectiveLimits) -> None:
    pg, pool, proxy = limits.postgres, limits.pgbouncer, limits.proxy
    if pg.connection_limit >= 0 and pool.pool_size + pool.reserve_pool_size > pg.connection_limit:
        raise ResolveError(
            "InvalidLimits",
            f"tier {limits.tier} with overrides: pool {pool.pool_size}+{pool.reserve_pool_size} > "
            f"connectionLimit {pg.connection_limit}: {POOL_FITS_MESSAGE}",
        )
    if proxy.qps is not None and proxy.burst is not None and proxy.burst < proxy.qps:
        raise ResolveError(
            "InvalidLimits",
            f"tier {limits.tier} with overrides: burst {proxy.burst} < qps {proxy.qps}; raise burst",
        )
    if pg.work_mem is not None and not 64 * 1024 <= pg.work_mem.bytes <= 2 * 1024**3:
        raise ResolveError("InvalidLimits", f"workMem {pg.work_mem} is outside 64kB..2GB")
    if pg.temp_buffers is not None and pg.temp_buffers.bytes < 800 * 1024:
        raise ResolveError("InvalidLimits", f"tempBuffers {pg.temp_buffers} is below 800kB")


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
