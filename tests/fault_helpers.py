"""What the fault tests share: a devstack of their own to break (killed and started again on
the same ports, so the session's stack stays whole), a policy, tenants, and probes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from dynabase.backends.proxy import ProxyBackend
from dynabase.devstack.stack import Devstack
from dynabase.engine.reconciler import Engine, TenantResult
from dynabase.engine.runtime import close_engine
from dynabase.engine.stores import MemoryStatusStore
from dynabase.keyspace import LIMITS_KEY, usage_field, usage_key
from dynabase.keyspace import encode_usage as encode
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy

from .engine_helpers import FakeClock, make_engine

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "faults"},
    "spec": {"tiers": {
        # 0.01 vCPU-hours (36 vCPU-seconds) included, a soft period of a minute.
        "TINY": {"rank": 0, "proxy": {"qps": 50},
                 "billing": {"includedVcpuHours": 0.01, "softOveragePeriod": "1m", "restrictedQps": 2}},
        "TINYRO": {"rank": 1, "proxy": {"qps": 50},
                   "billing": {"includedVcpuHours": 0.01, "softOveragePeriod": "1m",
                               "overageRestriction": "readOnly"}},
        "NAP": {"rank": 2, "lifecycle": {"idleTimeout": "1s"}},
        "LOW": {"rank": 3, "postgres": {"connectionLimit": 4}, "redis": {"maxKeys": 5}, "pgbouncer": {"poolSize": 2},
                "railway": {"replicas": 1, "vCPUs": 0.5, "memoryGB": 0.5}},
        "HOT": {"rank": 4, "postgres": {"connectionLimit": 9}, "redis": {"maxKeys": 100},
                "pgbouncer": {"poolSize": 3}, "railway": {"replicas": 2, "vCPUs": 1, "memoryGB": 1}},
    }},
})
POLICIES = {"faults": POLICY}


def tenant(tier: str, **spec: Any) -> TenantDatabase:
    db = f"sf_{tier.lower()}_{uuid.uuid4().hex[:6]}"
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "faults", "generation": 1},
        "spec": {"orgId": "org", "tier": tier, "tierPolicyRef": "faults", "databaseName": db, **spec},
    })


def with_tier(t: TenantDatabase, tier: str) -> TenantDatabase:
    raw = t.model_dump(by_alias=True, exclude_none=True, mode="json")
    raw["spec"]["tier"] = tier
    raw["metadata"]["generation"] += 1
    return TenantDatabase.model_validate(raw)


@contextlib.contextmanager
def devstack(services: list[str]) -> Iterator[Devstack]:
    # Not pytest's tmp_path: its 0700 parents keep the postgres user out when run as root.
    root = Path(tempfile.mkdtemp(prefix="dynabase-faults-"))
    stack = Devstack(root)
    try:
        stack.up(services, build=False)
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Faults:
    """A devstack to break: services are killed and started again on their ports."""

    devstack: Devstack

    @property
    def env(self) -> dict[str, str]:
        return self.devstack.env()

    async def kill(self, service: str) -> None:
        await asyncio.to_thread(self.devstack.stop, service, kill=True)

    async def start(self, service: str) -> None:
        await asyncio.to_thread(self.devstack.start, service)

    @contextlib.asynccontextmanager
    async def down(self, service: str) -> AsyncIterator[None]:
        """``service`` killed inside the block, running again after it (also when the block fails)."""
        await self.kill(service)
        try:
            yield
        finally:
            await self.start(service)


@contextlib.contextmanager
def faulty_stack() -> Iterator[Faults]:
    """Postgres, Redis and the PgBouncer agent, to break."""
    with devstack(["postgres", "redis", "pgbouncer"]) as own:
        yield Faults(own)


@contextlib.asynccontextmanager
async def faulty_engine(faults: Faults) -> AsyncIterator[tuple[Engine, FakeClock, MemoryStatusStore]]:
    """An engine over the faulty stack's Postgres and platform Redis (proxy limits, usage, activity)."""
    clock = FakeClock()
    # Mid-month and long ago: the month's usage is what a test writes, whatever the date today.
    clock.now = dt.datetime(2001, 3, 15, 12, 0, tzinfo=dt.UTC)
    built, _, statuses = await make_engine(faults.env["DYNABASE_POSTGRES_DSN"], clock)
    built.proxy = ProxyBackend(faults.env["DYNABASE_REDIS_URL"])
    try:
        yield built, clock, statuses
    finally:
        await close_engine(built)


async def one(engine: Engine, t: TenantDatabase) -> TenantResult:
    return (await engine.reconcile_all(POLICIES, [t])).tenants[0]


def condition(status: TenantDatabaseStatus | None, type_: str) -> Any:
    assert status is not None
    found = status.condition(type_)
    assert found is not None, f"no {type_} condition in {status.conditions}"
    return found


async def role_config(dsn: str, role: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetchval("SELECT coalesce(rolconfig, '{}') FROM pg_roles WHERE rolname = $1", role))
    finally:
        await conn.close()


async def published(url: str, database: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return dict(json.loads(await client.hget(LIMITS_KEY, database) or "{}"))
    finally:
        await client.aclose()


async def metered(url: str, t: TenantDatabase, now: dt.datetime, query_seconds: float) -> None:
    """Usage as a proxy replica flushes it (0.42 vCPU-s per query-second in the default model)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await client.hset(usage_key(int(now.timestamp()) // 3600), usage_field(t.key, "r1"),
                          encode({"queries": 100, "query_seconds": query_seconds, "connections": 1}, t.spec.tier))
    finally:
        await client.aclose()
