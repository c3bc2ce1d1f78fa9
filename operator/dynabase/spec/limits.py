"""Every limit a tier can set, declared once.

Each section is a frozen dataclass of effective values: what the engine and the
backends read (``limits.postgres.connection_limit`` is an ``int``). Each
attribute's default is the documented default and its ``Limit`` says the rest
(see ``dynabase.spec.limit``). The spec models and the CRD (``spec.tier``), the
review rows, the org document and the PgBouncer settings are derived from here.

Adding a limit: one attribute here, and the backend that enforces it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from .limit import CrossRule, Limit, LimitField, PgBouncerKeys, limit, section_fields
from .units import ByteSize, Duration

PoolMode = Literal["session", "transaction", "statement"]
OverLimit = Literal["throttle", "reject"]
QpsScope = Literal["organization", "database"]
OverageRestriction = Literal["qps", "readOnly"]
RestartPolicy = Literal["ALWAYS", "ON_FAILURE", "NEVER"]

# Postgres' own ranges for the role settings (pg_settings.min_val/max_val).
PG_MAX_MS = "2147483647ms"
PG_MAX_KB = "2147483647kB"
PG_MAX_TEMP_BUFFERS = f"{1073741823 * 8}kB"  # 1073741823 blocks of 8kB


def _role_timeout(setting: str, review: str | None = None, org: str | None = None) -> Limit:
    return Limit(f"{setting} on the tenant role.", at_most=PG_MAX_MS, example="30s",
                 absent="Default: not set (server default).", role_setting=setting, review=review, org=org)


@dataclass(frozen=True)
class PostgresEffective:
    connection_limit: int = limit(10, Limit(
        "CONNECTION LIMIT of the tenant's login role; -1 means unlimited.", ge=-1, le=10_000,
        unlimited="negative", review="connections", org="connectionLimit"))
    statement_timeout: Duration | None = limit(None, _role_timeout(
        "statement_timeout", review="statement timeout", org="statementTimeoutMs"))
    idle_in_transaction_session_timeout: Duration | None = limit(None, _role_timeout(
        "idle_in_transaction_session_timeout", review="idle in transaction"))
    idle_session_timeout: Duration | None = limit(None, _role_timeout("idle_session_timeout"))
    work_mem: ByteSize | None = limit(None, Limit(
        "work_mem on the tenant role.", at_least="64kB", at_most="2GB", example="4MB",
        absent="Default: not set.", role_setting="work_mem", review="work_mem"))
    temp_buffers: ByteSize | None = limit(None, Limit(
        "temp_buffers on the tenant role.", at_least="800kB", at_most=PG_MAX_TEMP_BUFFERS, example="8MB",
        absent="Default: not set.", role_setting="temp_buffers"))
    temp_file_limit: ByteSize | None = limit(None, Limit(
        "temp_file_limit on the tenant role.", at_most=PG_MAX_KB, example="1GB", unlimited="absent",
        absent="Default: not set (unlimited).", role_setting="temp_file_limit"))


@dataclass(frozen=True)
class PgBouncerEffective:
    pool_size: int = limit(5, Limit(
        "Server connections per tenant pool.", ge=1, le=1000, review="pool size",
        pgbouncer=PgBouncerKeys("default_pool_size", database="pool_size", shown="pool_size")))
    reserve_pool_size: int = limit(0, Limit(
        "Extra server connections under load.", ge=0, le=1000,
        pgbouncer=PgBouncerKeys("reserve_pool_size", database="reserve_pool")))
    max_db_connections: int = limit(0, Limit(
        "Cap on server connections to the tenant database; 0 = none.", ge=0, le=10_000, unlimited="zero",
        pgbouncer=PgBouncerKeys("max_db_connections", database="max_db_connections", shown="max_connections")))
    max_user_connections: int = limit(0, Limit(
        "Cap on server connections of the tenant role; 0 = none.", ge=0, le=10_000, unlimited="zero",
        pgbouncer=PgBouncerKeys("max_user_connections", user="max_user_connections")))
    pool_mode: PoolMode = limit("transaction", Limit(
        "session, transaction or statement.", review="pool mode",
        pgbouncer=PgBouncerKeys("pool_mode", database="pool_mode", user="pool_mode", shown="pool_mode")))


@dataclass(frozen=True)
class ProxyEffective:
    max_connections: int = limit(100, Limit(
        "Client connections per tenant through the proxy.", ge=1, le=100_000, review="max connections",
        org="maxConnections"))
    qps: int | None = limit(None, Limit(
        "Queries per second per tenant over all proxy replicas.", ge=1, le=1_000_000, unlimited="absent",
        review="queries/s", org="qps"))
    burst: int | None = limit(None, Limit(
        "Bucket depth in queries; at least qps.", ge=1, le=10_000_000, default_from="qps", review="burst",
        org="burst"))
    queue_timeout: Duration = limit(Duration.of_ms(1000), Limit(
        "How long a throttled query may wait before it is rejected."))
    over_limit: OverLimit = limit("throttle", Limit("throttle (delay up to queueTimeout) or reject at once."))
    qps_scope: QpsScope = limit("organization", Limit(
        "Who shares the qps budget: organization (all databases with this orgId together, over all proxy "
        "replicas) or database (each database its own).", review="qps scope"))


@dataclass(frozen=True)
class RedisEffective:
    max_memory: ByteSize | None = limit(None, Limit(
        "Memory for the tenant's keys.", unlimited="absent", review="max memory", org="maxMemory"))
    max_keys: int | None = limit(None, Limit(
        "Number of keys under the tenant prefix.", ge=1, unlimited="absent", review="max keys",
        org="maxKeys"))


@dataclass(frozen=True)
class MongoEffective:
    max_connections: int | None = limit(None, Limit(
        "Advisory connection limit written to the org record.", ge=1, unlimited="absent",
        org="maxConnections"))


@dataclass(frozen=True)
class LifecycleEffective:
    idle_timeout: Duration | None = limit(None, Limit(
        "Scale to zero after this long without queries.", absent="Absent = never."))
    cold_warning: Duration | None = limit(None, Limit(
        "Notify (ColdSoon) this long before an idle tenant goes Cold, i.e. once it has been idle for "
        "idleTimeout minus this.", example="5m", absent="Absent = no warning."))
    downgrade_grace_period: Duration = limit(Duration.of_ms(15 * 60_000), Limit(
        "How long a downgrade waits before limits are lowered."))


@dataclass(frozen=True)
class RailwayEffective:
    replicas: int = limit(1, Limit("Service replicas.", ge=0, le=50, review="replicas"))
    sleep_application: bool = limit(False, Limit(
        "Let Railway sleep the service when idle.", review="sleep when idle"))
    v_cpus: float | None = limit(None, Limit(
        "vCPU limit per replica.", alias="vCPUs", gt=0, le=64, absent="Absent = Railway's plan default.",
        review="vCPUs"))
    memory_gb: float | None = limit(None, Limit(
        "Memory limit in GB per replica.", alias="memoryGB", gt=0, le=256, absent="Absent = plan default.",
        review="memory GB"))
    restart_policy: RestartPolicy | None = limit(None, Limit(
        "ALWAYS, ON_FAILURE or NEVER.", absent="Absent = leave the service's setting alone.",
        review="restart policy"))
    restart_policy_max_retries: int | None = limit(None, Limit(
        "Restarts before giving up (ON_FAILURE).", ge=0, le=100, absent="Absent = leave alone."))


@dataclass(frozen=True)
class BillingEffective:
    base_fee_usd: float = limit(0.0, Limit("Monthly base fee.", alias="baseFeeUSD", ge=0, org="baseFeeUSD"))
    included_vcpu_hours: float = limit(0.0, Limit(
        "vCPU-hours included each month.", ge=0, org="includedVcpuHours"))
    overage_per_vcpu_hour_usd: float | None = limit(None, Limit(
        "Price per vCPU-hour over the included amount.", alias="overagePerVcpuHourUSD", ge=0,
        absent="Absent = no overage sold.", org="overagePerVcpuHourUSD"))
    soft_overage_period: Duration = limit(Duration.of_ms(7 * 86_400_000), Limit(
        "Without an overage price: how long a tenant may stay over its included usage before it is "
        "restricted until the next month or an upgrade."))
    overage_restriction: OverageRestriction = limit("qps", Limit(
        "qps (lower the proxy's queries per second to restrictedQps) or readOnly "
        "(default_transaction_read_only on the role)."))
    restricted_qps: int = limit(1, Limit("Queries per second while restricted.", ge=1, le=1_000_000))


@dataclass(frozen=True)
class Limits:
    """Every section, defaults applied; the section names are the manifest's (tier.postgres, …)."""

    postgres: PostgresEffective = dataclasses.field(default_factory=PostgresEffective)
    pgbouncer: PgBouncerEffective = dataclasses.field(default_factory=PgBouncerEffective)
    proxy: ProxyEffective = dataclasses.field(default_factory=ProxyEffective)
    redis: RedisEffective = dataclasses.field(default_factory=RedisEffective)
    mongo: MongoEffective = dataclasses.field(default_factory=MongoEffective)
    lifecycle: LifecycleEffective = dataclasses.field(default_factory=LifecycleEffective)
    railway: RailwayEffective = dataclasses.field(default_factory=RailwayEffective)
    billing: BillingEffective = dataclasses.field(default_factory=BillingEffective)


SECTION_TYPES: dict[str, type] = dict(typing.get_type_hints(Limits))
FIELDS: dict[str, tuple[LimitField, ...]] = {
    name: section_fields(name, section_type) for name, section_type in SECTION_TYPES.items()
}
ALL_FIELDS: tuple[LimitField, ...] = tuple(f for fields in FIELDS.values() for f in fields)


def declared(section: str, name: str) -> LimitField:
    return next(f for f in FIELDS[section] if f.name == name)


# -- rules over several limits ------------------------------------------------------


def _pool_fits(connection_limit: int | None, pool_size: int | None, reserve_pool_size: int | None) -> bool:
    if connection_limit is None or connection_limit < 0 or pool_size is None:
        return True  # unlimited, or not declared at this level
    return pool_size + (reserve_pool_size or 0) <= connection_limit


def _burst_covers_qps(qps: int | None, burst: int | None) -> bool:
    return qps is None or burst is None or burst >= qps


POOL_FITS = CrossRule(
    at=None,
    operands=(declared("postgres", "connection_limit"), declared("pgbouncer", "pool_size"),
              declared("pgbouncer", "reserve_pool_size")),
    holds=_pool_fits,
    cel="!has(self.postgres) || !has(self.postgres.connectionLimit) || self.postgres.connectionLimit < 0"
    " || !has(self.pgbouncer) || !has(self.pgbouncer.poolSize)"
    " || self.pgbouncer.poolSize + (has(self.pgbouncer.reservePoolSize) ? self.pgbouncer.reservePoolSize : 0)"
    " <= self.postgres.connectionLimit",
    message="pgbouncer.poolSize + reservePoolSize must not exceed postgres.connectionLimit, or PgBouncer "
    "opens server connections Postgres refuses; lower the pool or raise the connection limit",
    field_path=".pgbouncer.poolSize",
)
BURST_COVERS_QPS = CrossRule(
    at="proxy",
    operands=(declared("proxy", "qps"), declared("proxy", "burst")),
    holds=_burst_covers_qps,
    cel="!has(self.burst) || !has(self.qps) || self.burst >= self.qps",
    message="burst must be at least qps (a smaller bucket throttles traffic that is within the limit); "
    "raise burst or remove it to default to qps",
    field_path=".burst",
)
CROSS_RULES: tuple[CrossRule, ...] = (POOL_FITS, BURST_COVERS_QPS)
