"""What the proxy enforces per tenant, as published by the engine. Pure.

The engine writes one entry per tenant database to Redis and every proxy replica
keeps a copy (names and JSON: dynabase.keyspace).
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.qps is not None and self.burst is None:
            raise ValueError(f"proxy limits for {self.database}: qps {self.qps} without a burst; "
                             "effective limits default burst to qps, so publish those")


def proxy_limits(tenant_key: str, database: str, pool: str, limits: EffectiveLimits,
                 *, enabled: bool = True, cold: bool = False) -> ProxyTenantLimits:
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
    )


def plan_lines(old: ProxyTenantLimits | None, new: ProxyTenantLimits | None) -> list[str]:
    if old == new:
        return []
    if new is None:
        return ["remove proxy limits"]
    if old is not None and old.cold != new.cold and replace(old, cold=new.cold) == new:
        return ["proxy: mark Cold (wake on next connection)" if new.cold else "proxy: mark awake"]
    qps = "unlimited" if new.qps is None else f"{new.qps}/s burst {new.burst}"
    return [f"proxy limits: {new.max_connections} connections, {qps} ({new.over_limit}), "
            f"statement timeout {new.statement_timeout_ms or 'none'} ms"]


def restricted(limits: ProxyTenantLimits, restriction: str | None, restricted_qps: int) -> ProxyTenantLimits:
    """A tenant restricted to a lower rate (over its included usage) gets at most ``restricted_qps``."""
    if restriction != "qps":
        return limits
    qps = restricted_qps if limits.qps is None else min(limits.qps, restricted_qps)
    return replace(limits, qps=qps, burst=qps)


def lowers(before: ProxyTenantLimits | None, after: ProxyTenantLimits) -> bool:
    """Whether publishing ``after`` lowers the connections or rate the proxy allows (None: unlimited)."""
    if before is None:
        return False

    def qps(value: int | None) -> float:
        return float("inf") if value is None else value
    return after.max_connections < before.max_connections or qps(after.qps) < qps(before.qps)
