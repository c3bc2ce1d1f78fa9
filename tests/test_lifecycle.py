"""Graceful downgrades (connections over the new cap drained) and scale to zero
(Cold after idleTimeout, woken by the next connection), with the real proxy,
PgBouncer, Postgres and Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.engine.reconciler import Engine, TenantResult
from dynabase.engine.runtime import close_engine
from dynabase.keyspace import ACTIVITY_KEY, LIMITS_KEY, WAKE_CHANNEL
from dynabase.proxy.server import COLD_STARTS
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .proxy_helpers import running_proxy

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "lifecycle"},
    "spec": {"tiers": {
        "LOW": {"rank": 0, "postgres": {"connectionLimit": 4}, "pgbouncer": {"poolSize": 2},
                "proxy": {"maxConnections": 2}},
        "NAP": {"rank": 1, "postgres": {"connectionLimit": 5}, "pgbouncer": {"poolSize": 2},
                "proxy": {"maxConnections": 5}, "lifecycle": {"idleTimeout": "1s"}},
        "HOT": {"rank": 2, "postgres": {"connectionLimit": 8}, "pgbouncer": {"poolSize": 3, "poolMode": "session"},
                "proxy": {"maxConnections": 6}, "lifecycle": {"downgradeGracePeriod": "10m"}},
    }},
})
POLICIES = {"lifecycle": POLICY}
pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Env:
    stack: Stack
    engine: Engine
    clock: FakeClock
    secrets: Any
    port: int

    async def reconcile(self, tenant: TenantDatabase) -> TenantResult:
        result = await self.engine.reconcile_all(POLICIES, [tenant])
        return result.tenants[0]

    def password(self, tenant: TenantDatabase) -> str:
        return str(self.secrets.passwords[tenant.key])

    async def direct(self, tenant: TenantDatabase) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=int(self.stack.env["PGPORT"]), user=tenant.database_name,
                                     password=self.password(tenant), database=tenant.database_name)

    async def proxied(self, tenant: TenantDatabase) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.port, user=tenant.database_name,
                                     password=self.password(tenant), database=tenant.database_name,
                                     ssl=False, statement_cache_size=0)

    async def sessions(self, role: str) -> int:
        conn = await asyncpg.connect(self.stack.env["DYNABASE_POSTGRES_DSN"])
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", role))
        finally:
            await conn.close()


def tenant(tier: str) -> TenantDatabase:
    db = f"lc_{tier.lower()}_{uuid.uuid4().hex[:6]}"
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "lifecycle", "generation": 1},
        "spec": {"orgId": "org", "tier": tier, "tierPolicyRef": "lifecycle", "databaseName": db},
    })


def with_tier(t: TenantDatabase, tier: str) -> TenantDatabase:
    raw = t.model_dump(by_alias=True, exclude_none=True, mode="json")
    raw["spec"]["tier"] = tier
    raw["metadata"]["generation"] += 1
    return TenantDatabase.model_validate(raw)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(stack: Stack) -> AsyncIterator[Env]:
    clock = FakeClock()
    clock.now = dt.datetime.now(dt.UTC)
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    try:
        async with running_proxy(stack.env["DYNABASE_REDIS_URL"], f"lifecycle-{uuid.uuid4().hex[:6]}") as (port, _):
            yield Env(stack, engine, clock, secrets, port)
    finally:
        await close_engine(engine)


async def published(env: Env, database: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        return dict(json.loads(await client.hget(LIMITS_KEY, database) or "{}"))
    finally:
        await client.aclose()


async def test_a_downgrade_drains_postgres_sessions_over_the_new_limit_idle_first(env: Env) -> None:
    hot = tenant("HOT")
    assert (await env.reconcile(hot)).ready
    conns = [await env.direct(hot) for _ in range(7)]
    busy = [asyncio.create_task(c.fetchval("SELECT pg_sleep(3)")) for c in conns[:2]]
    await asyncio.sleep(0.3)
    low = with_tier(hot, "LOW")
    pending = await env.reconcile(low)
    assert pending.status is not None and pending.status.pending_tier == "LOW"
    assert await env.sessions(hot.database_name) == 7  # the grace period: nothing ended yet
    env.clock.advance(minutes=11)
    applied = await env.reconcile(low)
    try:
        assert applied.status is not None and applied.status.applied_tier == "LOW"
        assert await env.sessions(hot.database_name) == 4  # the new limit, no fewer
        assert await asyncio.gather(*busy) == [None, None]  # queries in flight were never the ones ended
        ended, alive = [], []
        for conn in conns[2:]:
            try:
                await conn.fetchval("SELECT 1")
                alive.append(conn)
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, asyncpg.InterfaceError):
                ended.append(conn)
        assert len(alive) == 2 and len(ended) == 3
        assert conns[2] in alive and conns[3] in alive  # the oldest idle ones stay; the newest went
        assert ("Normal", "ConnectionsDrained") in [(t, r) for t, r, _ in applied.events]
        assert applied.status.history[-1].drained_connections == 3
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def test_a_downgrade_drains_proxy_connections_over_the_new_cap(env: Env) -> None:
    hot = tenant("HOT")
    await env.reconcile(hot)
    await asyncio.sleep(1.2)  # the proxy has the new tenant's limits
    conns = [await env.proxied(hot) for _ in range(5)]
    in_tx = conns[0]
    await in_tx.execute("BEGIN")
    await in_tx.fetchval("SELECT 1")
    low = with_tier(hot, "LOW")
    await env.reconcile(low)
    env.clock.advance(minutes=11)
    await env.reconcile(low)
    try:
        closed: list[Any] = []
        for _ in range(40):
            await asyncio.sleep(0.05)
            closed = [c for c in conns if c.is_closed()]
            if len(closed) == 3:
                break
        # Proxy cap 2: three of five ended, the one in a transaction kept, then the oldest idle one.
        assert len(closed) == 3
        assert not in_tx.is_closed() and not conns[1].is_closed()
        await in_tx.execute("COMMIT")
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await env.proxied(hot)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def test_an_idle_tenant_goes_cold_and_the_next_connection_wakes_it(env: Env) -> None:
    nap = tenant("NAP")
    env.clock.now = dt.datetime.now(dt.UTC)
    first = await env.reconcile(nap)
    assert first.status is not None and first.status.phase == "Active"
    await asyncio.sleep(1.2)
    conn = await env.proxied(nap)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    await asyncio.sleep(2.5)  # the proxy's flush records the query; then 1s of idleness and more
    assert await env.sessions(nap.database_name) >= 1  # PgBouncer keeps a server connection
    env.clock.now = dt.datetime.now(dt.UTC)
    cold = await env.reconcile(nap)
    assert cold.status is not None and cold.status.phase == "Cold", cold.outcomes
    awake = cold.status.condition("Awake")
    assert awake is not None and awake.status == "False" and awake.reason == "IdleTimeout"
    assert cold.status.condition("Ready").status == "True"  # type: ignore[union-attr]
    assert ("Normal", "TenantCold") in [(t, r) for t, r, _ in cold.events]
    assert await env.sessions(nap.database_name) == 0
    assert (await published(env, nap.database_name))["cold"] is True

    # The next connection goes straight through, and tells the engine.
    await asyncio.sleep(1.2)  # the proxy has the Cold mark
    subscriber = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    pubsub = subscriber.pubsub()
    await pubsub.subscribe(WAKE_CHANNEL)
    starts_before = _histogram_count()
    started = dt.datetime.now(dt.UTC)
    try:
        conn = await env.proxied(nap)
        assert await conn.fetchval("SELECT 41 + 1") == 42
        await conn.close()
        message = None
        for _ in range(20):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                break
        assert message is not None and message["data"] == nap.database_name
        score = await subscriber.zscore(ACTIVITY_KEY, nap.database_name)
        assert score is not None and score >= started.timestamp() - 0.01
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await subscriber.aclose()
    assert _histogram_count() == starts_before + 1
    env.clock.now = dt.datetime.now(dt.UTC)
    woke = await env.reconcile(nap)
    assert woke.status is not None and woke.status.phase == "Active"
    assert ("Normal", "TenantWoke") in [(t, r) for t, r, _ in woke.events]
    assert (await published(env, nap.database_name))["cold"] is False


async def test_a_tier_without_idle_timeout_never_goes_cold(env: Env) -> None:
    low = tenant("LOW")
    env.clock.now = dt.datetime.now(dt.UTC)
    await env.reconcile(low)
    env.clock.advance(days=30)
    result = await env.reconcile(low)
    assert result.status is not None and result.status.phase == "Active" and not result.cold
    assert result.status.condition("Awake") is None


def _histogram_count() -> float:
    for metric in COLD_STARTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return float(sample.value)
    return 0.0


async def test_the_operator_reconciles_a_woken_tenant_at_once(env: Env) -> None:
    """A wake-up a proxy announces reaches the operator's runtime as a reconcile of that tenant."""
    from dynabase.kube.handlers import Runtime
    from dynabase.kube.settings import OperatorSettings

    submitted: list[str] = []

    class RecordingRuntime(Runtime):
        async def submit(self, body: Any, policy_index: Any) -> TenantResult | None:
            submitted.append(body["metadata"]["name"])
            return None

    runtime = RecordingRuntime(env.engine, None, None, OperatorSettings())  # type: ignore[arg-type]
    bodies = {"lifecycle": [
        {"metadata": {"name": "named-by-spec", "namespace": "n"}, "spec": {"databaseName": "db_one"}},
        {"metadata": {"name": "from-name", "namespace": "n"}, "spec": {}},
    ]}
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.wakes(bodies, {}, stop))
    redis = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"])
    try:
        await asyncio.sleep(0.3)  # subscribed
        await redis.publish(WAKE_CHANNEL, "from_name")
        await redis.publish(WAKE_CHANNEL, "nobody")
        for _ in range(30):
            await asyncio.sleep(0.1)
            if submitted:
                break
        assert submitted == ["from-name"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await redis.aclose()
