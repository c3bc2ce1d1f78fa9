"""Graceful downgrades (connections over the new cap drained) and scale to zero
(Cold after idleTimeout, woken by the next connection), with the real proxy,
PgBouncer, Postgres and Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.engine.reconciler import Engine, TenantResult
from dynabase.engine.runtime import close_engine
from dynabase.keyspace import ACTIVITY_KEY, LIMITS_KEY, WAKE_CHANNEL
from dynabase.proxy.server import COLD_STARTS, Proxy
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .events import WAIT_SECONDS, activity_recorded, ended, idle_in_postgres, subscribed, terminations
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
    proxy: Proxy

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

    async def proxy_has(self, tenant: TenantDatabase,
                        check: Callable[[ProxyTenantLimits], bool]) -> ProxyTenantLimits:
        """The proxy's limits for the tenant once it routes it under limits that pass check."""
        return await asyncio.wait_for(self.proxy.serves(tenant.database_name, check), WAIT_SECONDS)

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
        async with running_proxy(stack.env["DYNABASE_REDIS_URL"], f"lifecycle-{uuid.uuid4().hex[:6]}") as (port, proxy):
            yield Env(stack, engine, clock, secrets, port, proxy)
    finally:
        await close_engine(engine)


async def published(env: Env, database: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        return dict(json.loads(await client.hget(LIMITS_KEY, database) or "{}"))
    finally:
        await client.aclose()


async def busy_queries(env: Env, conns: list[asyncpg.Connection],
                       database: str) -> tuple[list[asyncio.Task[Any]], asyncpg.Connection]:
    """A query in flight on each connection, known to have started: each releases an advisory lock its
    session held (which the test is waiting to take) and then waits for a lock the test holds. Returns
    the queries and the connection holding that lock; releasing it lets them finish."""
    held = await asyncpg.connect(env.stack.env["DYNABASE_POSTGRES_DSN"], database=database)
    watcher = await asyncpg.connect(env.stack.env["DYNABASE_POSTGRES_DSN"], database=database)
    gate, started = 7_000, [7_001 + i for i in range(len(conns))]  # advisory locks are per database
    await held.execute("SELECT pg_advisory_lock($1)", gate)
    for conn, key in zip(conns, started, strict=True):
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    queries = [asyncio.create_task(conn.fetchval(
        "WITH started AS MATERIALIZED (SELECT pg_advisory_unlock($1)) "
        "SELECT pg_advisory_lock_shared($2) FROM started", key, gate))
        for conn, key in zip(conns, started, strict=True)]
    try:
        for key in started:  # granted once the query holding it has begun
            await asyncio.wait_for(watcher.execute("SELECT pg_advisory_lock($1)", key), WAIT_SECONDS)
    finally:
        await watcher.close()
    return queries, held


async def test_a_downgrade_drains_postgres_sessions_over_the_new_limit_idle_first(env: Env) -> None:
    hot = tenant("HOT")
    assert (await env.reconcile(hot)).ready
    conns = [await env.direct(hot) for _ in range(7)]
    busy, held = await busy_queries(env, conns[:2], hot.database_name)
    try:
        low = with_tier(hot, "LOW")
        pending = await env.reconcile(low)
        assert pending.status is not None and pending.status.pending_tier == "LOW"
        assert await env.sessions(hot.database_name) == 7  # the grace period: nothing ended yet
        env.clock.advance(minutes=11)
        applied = await env.reconcile(low)
        assert applied.status is not None and applied.status.applied_tier == "LOW"
        assert await env.sessions(hot.database_name) == 4  # the new limit, no fewer
        await held.execute("SELECT pg_advisory_unlock_all()")
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
        await held.close()
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def test_a_downgrade_drains_proxy_connections_over_the_new_cap(env: Env) -> None:
    hot = tenant("HOT")
    await env.reconcile(hot)
    await env.proxy_has(hot, lambda limits: limits.tier == "HOT")
    conns = [await env.proxied(hot) for _ in range(5)]
    gone = terminations(conns)
    in_tx = conns[0]
    await in_tx.execute("BEGIN")
    await in_tx.fetchval("SELECT 1")
    low = with_tier(hot, "LOW")
    await env.reconcile(low)
    env.clock.advance(minutes=11)
    await env.reconcile(low)
    try:
        # The proxy ends the connections over the cap as it takes the new limits in.
        await env.proxy_has(hot, lambda limits: limits.tier == "LOW")
        await ended(gone, 3)
        # Proxy cap 2: three of five ended, the one in a transaction kept, then the oldest idle one.
        assert [c.is_closed() for c in conns] == [False, False, True, True, True]
        await in_tx.execute("COMMIT")
        assert await conns[1].fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await env.proxied(hot)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def last_query_recorded(env: Env, tenant: TenantDatabase) -> dt.datetime:
    """One query through the proxy; returns the time its usage flush recorded as the tenant's last activity."""
    async with activity_recorded(env.stack.env["DYNABASE_REDIS_URL"], tenant.database_name) as recorded:
        conn = await env.proxied(tenant)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    return dt.datetime.fromtimestamp(recorded[tenant.database_name], dt.UTC)


async def gone_cold(env: Env, nap: TenantDatabase) -> TenantResult:
    """The NAP tenant queried once, then judged after its idleTimeout (1s) on the engine's clock."""
    env.clock.now = dt.datetime.now(dt.UTC)
    first = await env.reconcile(nap)
    assert first.status is not None and first.status.phase == "Active"
    await env.proxy_has(nap, lambda limits: limits.tier == "NAP")
    last_query = await last_query_recorded(env, nap)
    env.clock.now = last_query + dt.timedelta(seconds=0.5)
    still = await env.reconcile(nap)
    assert still.status is not None and still.status.phase == "Active" and not still.cold  # within idleTimeout
    assert await env.sessions(nap.database_name) >= 1  # PgBouncer keeps a server connection
    await idle_in_postgres(env.stack.env["DYNABASE_POSTGRES_DSN"], nap.database_name, 1.0)
    # Judged from the activity the engine reads: a later usage flush (the connection's close) may
    # have moved it past the query's own record.
    redis = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"])
    try:
        score = await redis.zscore(ACTIVITY_KEY, nap.database_name)
    finally:
        await redis.aclose()
    assert score is not None
    last_activity = max(last_query, dt.datetime.fromtimestamp(score, dt.UTC))
    env.clock.now = last_activity + dt.timedelta(seconds=1.5)
    cold = await env.reconcile(nap)
    assert cold.status is not None and cold.status.phase == "Cold", cold.outcomes
    await env.proxy_has(nap, lambda limits: limits.cold)
    return cold


async def test_an_idle_tenant_goes_cold_and_the_next_connection_wakes_it(env: Env) -> None:
    nap = tenant("NAP")
    cold = await gone_cold(env, nap)
    assert cold.status is not None
    awake = cold.status.condition("Awake")
    assert awake is not None and awake.status == "False" and awake.reason == "IdleTimeout"
    assert cold.status.condition("Ready").status == "True"  # type: ignore[union-attr]
    assert ("Normal", "TenantCold") in [(t, r) for t, r, _ in cold.events]
    assert await env.sessions(nap.database_name) == 0
    assert (await published(env, nap.database_name))["cold"] is True

    # The next connection goes straight through, and tells the engine.
    starts_before = _histogram_count()
    started = dt.datetime.now(dt.UTC)
    redis = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        async with subscribed(env.stack.env["DYNABASE_REDIS_URL"], WAKE_CHANNEL) as wakes:
            conn = await env.proxied(nap)
            assert await conn.fetchval("SELECT 41 + 1") == 42
            await conn.close()
            assert await wakes.next() == nap.database_name
        score = await redis.zscore(ACTIVITY_KEY, nap.database_name)
        assert score is not None and score >= started.timestamp() - 0.01
    finally:
        await redis.aclose()
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
    """A connection to a Cold tenant at the proxy reaches the operator's runtime, whose own pass
    (not the test's) brings the tenant back to Active."""
    from dynabase.kube import runtime as operator_runtime
    from dynabase.kube.settings import OperatorSettings
    from dynabase.kube.stores import KubeStatusStore

    nap = tenant("NAP")
    await gone_cold(env, nap)
    posted: list[tuple[str, str, str]] = []

    class EventsApi:  # the Events the runtime posts, recorded instead of sent to an apiserver
        async def post_event(self, involved: dict[str, str], namespace: str, type_: str, reason: str,
                             message: str, component: str) -> None:
            posted.append((involved["name"], type_, reason))

    passes: asyncio.Queue[TenantResult | None] = asyncio.Queue()

    class Runtime(operator_runtime.Runtime):  # the real submit, its results also handed to the test
        async def submit(self, body: Any, policy_index: Any) -> TenantResult | None:
            result = await super().submit(body, policy_index)
            passes.put_nowait(result)
            return result

    runtime = Runtime(env.engine, cast(Any, EventsApi()), KubeStatusStore(cast(Any, None)), OperatorSettings())
    body = nap.model_dump(by_alias=True, exclude_none=True, mode="json")
    del body["spec"]["databaseName"]  # found by the name it is derived from
    bystander = tenant("NAP").model_dump(by_alias=True, exclude_none=True, mode="json")
    policies = {"lifecycle": [POLICY.model_dump(by_alias=True, exclude_none=True, mode="json")]}
    assert isinstance(env.engine.proxy, ProxyBackend)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.wakes({"lifecycle": [bystander, body]}, policies, stop))
    redis = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"])
    try:
        await asyncio.wait_for(env.engine.proxy.wakes_subscribed.wait(), WAIT_SECONDS)
        await redis.publish(WAKE_CHANNEL, "nobody")  # no tenant of that database: nothing happens
        env.clock.now = dt.datetime.now(dt.UTC)
        conn = await env.proxied(nap)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        woke = await asyncio.wait_for(passes.get(), WAIT_SECONDS)
        assert woke is not None and woke.key == nap.key
        assert woke.status is not None and woke.status.phase == "Active", woke.outcomes
        assert posted == [(nap.metadata.name, "Normal", "TenantWoke")]
        assert (await published(env, nap.database_name))["cold"] is False
        await env.proxy_has(nap, lambda limits: not limits.cold)
        assert passes.empty()  # the bystander and "nobody" were not reconciled
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_SECONDS)
        await redis.aclose()
