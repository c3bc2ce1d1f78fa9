"""What the proxy enforces per tenant, as published by the engine. Pure.

The engine writes one hash field per tenant (keyed by database name) and
announces changes on a channel; every proxy replica keeps a local copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .effective import EffectiveLimits

LIMITS_KEY = "dynabase:proxy:limits"
LIMITS_CHANNEL = "dynabase:proxy:limits:changed"
ROUTES_KEY = "dynabase:proxy:routes"  # database -> PgBouncer pool name


@dataclass(frozen=True)
class ProxyTenantLimits:
    tenant: str  # namespace/name, for messages and metering
    database: str
    role: str
    tier: str
    pool: str
    max_connections: int
    qps: int | None
    burst: int | None
    queue_timeout_ms: int
    over_limit: str
    statement_timeout_ms: int | None
    idle_in_transaction_ms: int | None
    enabled: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ProxyTenantLimits:
        return cls(**json.loads(text))


def proxy_limits(tenant_key: str, database: str, pool: str, limits: EffectiveLimits,
                 *, enabled: bool = True) -> ProxyTenantLimits:
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
    )


def plan_lines(old: ProxyTenantLimits | None, new: ProxyTenantLimits | None) -> list[str]:
    if old == new:
        return []
    if new is None:
        return ["remove proxy limits"]
    qps = "unlimited" if new.qps is None else f"{new.qps}/s burst {new.burst}"
    return [f"proxy limits: {new.max_connections} connections, {qps} ({new.over_limit}), "
            f"statement timeout {new.statement_timeout_ms or 'none'} ms"]
