"""TierPolicy: the named tiers (FREE, STARTER, PRO, ENTERPRISE …) and their limits.

Every limit is optional. ``None`` means "not declared here", which matters for
overrides: a tenant's override is merged field by field over its tier, and the
documented default applies only where neither declares a value (see
``dynabase.desired.effective``). Defaults are therefore *not* written into the
CRD schema; the apiserver would otherwise fill them into overrides too.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from .base import Model, Rule
from .units import ByteSize, Duration

TIER_NAME_PATTERN = r"^[A-Z][A-Z0-9_]{0,31}$"
MAX_TIERS = 32

PoolMode = Literal["session", "transaction", "statement"]
OverLimit = Literal["throttle", "reject"]
OverageRestriction = Literal["qps", "readOnly"]
RestartPolicy = Literal["ALWAYS", "ON_FAILURE", "NEVER"]


class PostgresLimits(Model):
    connection_limit: int | None = Field(
        None, ge=-1, le=10_000,
        description="CONNECTION LIMIT of the tenant's login role; -1 means unlimited. Default 10.",
    )
    statement_timeout: Duration | None = Field(
        None, description="statement_timeout set on the tenant role. Default: not set (server default)."
    )
    idle_in_transaction_session_timeout: Duration | None = Field(
        None, description="idle_in_transaction_session_timeout on the tenant role. Default: not set."
    )
    idle_session_timeout: Duration | None = Field(
        None, description="idle_session_timeout on the tenant role. Default: not set."
    )
    work_mem: ByteSize | None = Field(
        None, description="work_mem on the tenant role (64kB to 2GB). Default: not set."
    )
    temp_buffers: ByteSize | None = Field(
        None, description="temp_buffers on the tenant role (at least 800kB). Default: not set."
    )
    temp_file_limit: ByteSize | None = Field(
        None, description="temp_file_limit on the tenant role. Default: not set (unlimited)."
    )

    rules = (
        Rule(
            cel="!has(self.workMem) || (self.workMem.matches('^[0-9]+(kB|KB|KiB|MB|MiB|GB|GiB)$'))",
            message="workMem must be between 64kB and 2GB, written in kB, MB or GB, "
            "for example workMem: 4MB",
            holds=lambda m: m.work_mem is None or 64 * 1024 <= m.work_mem.bytes <= 2 * 1024**3,
            field_path=".workMem",
        ),
        Rule(
            cel="!has(self.tempBuffers) || !self.tempBuffers.matches('^[0-9]+B$')",
            message="tempBuffers must be at least 800kB, for example tempBuffers: 8MB",
            holds=lambda m: m.temp_buffers is None or m.temp_buffers.bytes >= 800 * 1024,
            field_path=".tempBuffers",
        ),
    )


class PgBouncerLimits(Model):
    pool_size: int | None = Field(
        None, ge=1, le=1000, description="Server connections per tenant pool. Default 5."
    )
    reserve_pool_size: int | None = Field(
        None, ge=0, le=1000, description="Extra server connections under load. Default 0."
    )
    max_db_connections: int | None = Field(
        None, ge=0, le=10_000, description="Cap on server connections to the tenant database; 0 = none. Default 0."
    )
    max_user_connections: int | None = Field(
        None, ge=0, le=10_000, description="Cap on server connections of the tenant role; 0 = none. Default 0."
    )
    pool_mode: PoolMode | None = Field(None, description="session, transaction or statement. Default transaction.")


class ProxyLimits(Model):
    max_connections: int | None = Field(
        None, ge=1, le=100_000, description="Client connections per tenant through the proxy. Default 100."
    )
    qps: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Queries per second per tenant over all proxy replicas. Absent = unlimited.",
    )
    burst: int | None = Field(
        None, ge=1, le=10_000_000, description="Bucket depth in queries; at least qps. Default = qps."
    )
    queue_timeout: Duration | None = Field(
        None, description="How long a throttled query may wait before it is rejected. Default 1s."
    )
    over_limit: OverLimit | None = Field(
        None, description="throttle (delay up to queueTimeout) or reject at once. Default throttle."
    )

    rules = (
        Rule(
            cel="!has(self.burst) || !has(self.qps) || self.burst >= self.qps",
            message="burst must be at least qps (a smaller bucket throttles traffic that is "
            "within the limit); raise burst or remove it to default to qps",
            holds=lambda m: m.burst is None or m.qps is None or m.burst >= m.qps,
            field_path=".burst",
        ),
    )


class RedisLimits(Model):
    max_memory: ByteSize | None = Field(None, description="Memory for the tenant's keys. Absent = unlimited.")
    max_keys: int | None = Field(None, ge=1, description="Number of keys under the tenant prefix. Absent = unlimited.")


class MongoLimits(Model):
    max_connections: int | None = Field(
        None, ge=1, description="Advisory connection limit written to the org record. Absent = unlimited."
    )


class LifecycleLimits(Model):
    idle_timeout: Duration | None = Field(
        None, description="Scale to zero after this long without queries. Absent = never."
    )
    downgrade_grace_period: Duration | None = Field(
        None, description="How long a downgrade waits before limits are lowered. Default 15m."
    )


class RailwayLimits(Model):
    replicas: int | None = Field(None, ge=0, le=50, description="Service replicas. Default 1.")
    sleep_application: bool | None = Field(
        None, description="Let Railway sleep the service when idle. Default false."
    )
    v_cpus: float | None = Field(
        None, alias="vCPUs", gt=0, le=64, description="vCPU limit per replica. Absent = Railway's plan default."
    )
    memory_gb: float | None = Field(
        None, alias="memoryGB", gt=0, le=256, description="Memory limit in GB per replica. Absent = plan default."
    )
    restart_policy: RestartPolicy | None = Field(
        None, description="ALWAYS, ON_FAILURE or NEVER. Absent = leave the service's setting alone."
    )
    restart_policy_max_retries: int | None = Field(
        None, ge=0, le=100, description="Restarts before giving up (ON_FAILURE). Absent = leave alone."
    )


class Billing(Model):
    base_fee_usd: float | None = Field(None, alias="baseFeeUSD", ge=0, description="Monthly base fee. Default 0.")
    included_vcpu_hours: float | None = Field(
        None, ge=0, description="vCPU-hours included each month. Default 0."
    )
    overage_per_vcpu_hour_usd: float | None = Field(
        None, alias="overagePerVcpuHourUSD", ge=0,
        description="Price per vCPU-hour over the included amount. Absent = no overage sold.",
    )
    soft_overage_period: Duration | None = Field(
        None, description="Without an overage price: how long a tenant may stay over its included usage "
        "before it is restricted until the next month or an upgrade. Default 7d.",
    )
    overage_restriction: OverageRestriction | None = Field(
        None, description="qps (lower the proxy's queries per second to restrictedQps) or readOnly "
        "(default_transaction_read_only on the role). Default qps.",
    )
    restricted_qps: int | None = Field(
        None, ge=1, le=1_000_000, description="Queries per second while restricted. Default 1.",
    )


_POOL_FITS_CEL = (
    "!has(self.postgres) || !has(self.postgres.connectionLimit) || self.postgres.connectionLimit < 0"
    " || !has(self.pgbouncer) || !has(self.pgbouncer.poolSize)"
    " || self.pgbouncer.poolSize + (has(self.pgbouncer.reservePoolSize) ? self.pgbouncer.reservePoolSize : 0)"
    " <= self.postgres.connectionLimit"
)
POOL_FITS_MESSAGE = (
    "pgbouncer.poolSize + reservePoolSize must not exceed postgres.connectionLimit, or PgBouncer "
    "opens server connections Postgres refuses; lower the pool or raise the connection limit"
)


def pool_fits(postgres: PostgresLimits | None, pgbouncer: PgBouncerLimits | None) -> bool:
    if postgres is None or pgbouncer is None:
        return True
    if postgres.connection_limit is None or postgres.connection_limit < 0 or pgbouncer.pool_size is None:
        return True
    return pgbouncer.pool_size + (pgbouncer.reserve_pool_size or 0) <= postgres.connection_limit


class TierLimits(Model):
    """Every limit a tier declares; also the shape of a tenant's overrides."""

    postgres: PostgresLimits | None = None
    pgbouncer: PgBouncerLimits | None = None
    proxy: ProxyLimits | None = None
    redis: RedisLimits | None = None
    mongo: MongoLimits | None = None
    lifecycle: LifecycleLimits | None = None
    railway: RailwayLimits | None = None
    billing: Billing | None = None

    rules = (
        Rule(
            cel=_POOL_FITS_CEL,
            message=POOL_FITS_MESSAGE,
            holds=lambda m: pool_fits(m.postgres, m.pgbouncer),
        ),
    )


class Tier(TierLimits):
    rank: int = Field(
        ..., ge=0, le=1000,
        description="Order of tiers: a move to a higher rank is an upgrade (applied at once), "
        "to a lower rank a downgrade (applied after the grace period).",
    )
    description: str | None = Field(None, max_length=256)


class TierPolicySpec(Model):
    tiers: dict[str, Tier] = Field(
        ..., min_length=1, max_length=MAX_TIERS,
        description="Tiers by name (upper case, e.g. FREE, PRO).",
    )

    rules = (
        Rule(
            cel="self.tiers.all(name, name.matches('" + TIER_NAME_PATTERN + "'))",
            message="tier names must be upper case letters, digits and _ starting with a letter "
            "(at most 32), for example FREE or PRO_PLUS",
            holds=lambda m: all(re.fullmatch(TIER_NAME_PATTERN, n) for n in m.tiers),
            field_path=".tiers",
        ),
        Rule(
            cel="self.tiers.all(a, self.tiers.all(b, a == b || self.tiers[a].rank != self.tiers[b].rank))",
            message="every tier needs its own rank: ranks order upgrades and downgrades; "
            "give each tier a different rank",
            holds=lambda m: len({t.rank for t in m.tiers.values()}) == len(m.tiers),
            field_path=".tiers",
        ),
    )
