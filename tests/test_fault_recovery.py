"""Faults the servers beside the engine ride out: the platform's Redis restarted without its
data (proxies keep their limits and write their usage and activity again, PgBouncer agents
keep their pools), and a PgBouncer agent killed (its PgBouncers keep serving; the next agent
adopts them). Real processes are killed (tests/fault_helpers.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.keyspace import ACTIVITY_KEY, AGENTS_KEY, decode_agent_report, usage_field, usage_key
from dynabase.proxy.metering import HourlyMeter, Usage
from dynabase.spec import TenantDatabase

from .conftest import Stack
from .engine_helpers import FakeClock
from .events import activity_recorded, key_writes
from .fault_helpers import Faults, condition, faulty_engine, faulty_stack, one, tenant, with_tier
from .proxy_helpers import running_proxy


@pytest.fixture(scope="module")
def faults(stack: Stack) -> Iterator[Faults]:
    with faulty_stack() as own:
        yield own


@pytest_asyncio.fixture(loop_scope="session")
async def engine(faults: Faults) -> AsyncIterator[tuple[Engine, FakeClock, MemoryStatusStore]]:
    async with faulty_engine(faults) as built:
        yield built


def test_the_meter_writes_the_last_ended_hour_again_when_asked() -> None:
    meter, usage = HourlyMeter(), Usage("ns/t", "LOW")
    hour = 500_000 * 3600.0
    usage.queries = 7
    assert meter.per_hour(usage, hour + 10) == [(500_000, {**usage.snapshot(), "queries": 7})]
    usage.queries = 9
    ended_and_current = meter.per_hour(usage, hour + 3600 + 5)
    assert [(h, c["queries"]) for h, c in ended_and_current] == [(500_000, 9), (500_001, 0)]
    meter.flushed()
    assert [h for h, _ in meter.per_hour(usage, hour + 3600 + 6)] == [500_001]
    # Redis lost what it had: the ended hour is written again with its final values.
    usage.queries = 12
    assert [(h, c["queries"]) for h, c in meter.per_hour(usage, hour + 3600 + 7, again=True)] == \
        [(500_000, 9), (500_001, 3)]


# -- the platform's Redis lost its data: proxies and agents keep serving what they had ------


async def test_platform_redis_restarted_empty_proxies_and_agents_keep_serving_and_metering(
        faults: Faults, engine: tuple[Engine, FakeClock, MemoryStatusStore]) -> None:
    eng = engine[0]
    url = faults.env["DYNABASE_REDIS_URL"]
    eng.pgbouncer = PgBouncerBackend(url)
    secrets = eng.secrets
    assert isinstance(secrets, MemorySecretStore)
    low = tenant("LOW")
    try:
        replica = f"faults-{uuid.uuid4().hex[:6]}"
        async with running_proxy(url, replica) as (port, proxy):
            first = await one(eng, low)
            assert first.ready, first.outcomes
            await asyncio.wait_for(proxy.serves(low.database_name, lambda limits: limits.tier == "LOW"), 15)

            async def query(count: int) -> None:
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user=low.database_name,
                                             password=secrets.passwords[low.key], database=low.database_name,
                                             ssl=False, statement_cache_size=0)
                try:
                    for _ in range(count):
                        assert await conn.fetchval("SELECT 1") == 1
                finally:
                    await conn.close()

            async with activity_recorded(url, low.database_name):
                await query(5)
            async with faults.down("redis"):
                pass  # killed and started again: everything it held is gone

            client = aioredis.Redis.from_url(url, decode_responses=True)
            hour = usage_key(int(dt.datetime.now(dt.UTC).timestamp()) // 3600)
            field = usage_field(low.key, replica)

            async def counted() -> bool:
                text = await client.hget(hour, field)
                return text is not None and json.loads(text)["queries"] == 5

            async def active() -> bool:
                return await client.zscore(ACTIVITY_KEY, low.database_name) is not None
            try:
                # The proxy writes again what Redis lost, with no new query to prompt it.
                async with key_writes(url, hour) as writes:
                    await writes.until(counted, "the 5 queries metered again")
                async with key_writes(url, ACTIVITY_KEY) as writes:
                    await writes.until(active, "the tenant's last activity written again")
                async with key_writes(url, AGENTS_KEY) as writes:
                    async def keeping() -> bool:
                        reports = [decode_agent_report(k, v) for k, v in (await client.hgetall(AGENTS_KEY)).items()]
                        return bool(reports) and all(r.seq == 0 for r in reports)
                    await writes.until(keeping, "the agent keeping its pools, confirming nothing")
            finally:
                await client.aclose()
            # Through the proxy and the tenant's tier pool, as before: nothing was published since.
            assert proxy.tenants.limits[low.database_name].tier == "LOW"
            await query(5)

            back = await one(eng, low)  # publishes the layout and limits again; the agent confirms
            assert back.ready and back.events == [], (back.outcomes, back.events)
            await query(1)
    finally:
        assert eng.pgbouncer is not None
        await eng.pgbouncer.close()
        eng.pgbouncer = None


async def test_a_killed_pgbouncer_agent_leaves_its_pools_serving_and_the_next_one_adopts_them(
        faults: Faults, engine: tuple[Engine, FakeClock, MemoryStatusStore]) -> None:
    eng, _, _ = engine
    url = faults.env["DYNABASE_REDIS_URL"]
    eng.pgbouncer = PgBouncerBackend(url, confirm_timeout=2)
    secrets = eng.secrets
    assert isinstance(secrets, MemorySecretStore)
    low = tenant("LOW")
    try:
        first = await one(eng, low)
        assert first.ready, first.outcomes
        route = await eng.pgbouncer.route(low.database_name)
        assert route is not None and route[0] == "faults.LOW"
        conn = await asyncpg.connect(host="127.0.0.1", port=route[1], user=low.database_name,
                                     password=secrets.passwords[low.key], database=low.database_name,
                                     statement_cache_size=0)
        try:
            os.kill(faults.devstack.state.services["pgbouncer"].pid, signal.SIGKILL)  # its PgBouncers live on
            assert await conn.fetchval("SELECT 2") == 2

            # A change the dead agent cannot confirm: published, and said to be pending. Pool settings of
            # the tenant's own, so its PgBouncer must render it (a move between running pools alone is
            # confirmed by the agents' last report).
            raw = with_tier(low, "HOT").model_dump(by_alias=True, exclude_none=True, mode="json")
            raw["spec"]["overrides"] = {"pgbouncer": {"poolSize": 1}}
            own_pool = TenantDatabase.model_validate(raw)
            blind = await one(eng, own_pool)
            assert condition(blind.status, "PgBouncerReady").reason == "AgentPending"

            async with key_writes(url, AGENTS_KEY) as writes:
                await faults.start("pgbouncer")

                async def confirmed() -> bool:
                    observed = await eng.pgbouncer.observe()  # type: ignore[union-attr]
                    published_seq = observed.published.seq if observed.published else -1
                    return bool(observed.agents) and all(a.seq >= published_seq and all(
                        p.ok for p in a.pools.values()) for a in observed.agents)
                await writes.until(confirmed, "the new agent on the published layout")
            assert await conn.fetchval("SELECT 3") == 3  # the same server connection: adopted, not replaced
            back = await one(eng, own_pool)
            assert back.ready, back.outcomes
        finally:
            await conn.close()
    finally:
        assert eng.pgbouncer is not None
        await eng.pgbouncer.close()
        eng.pgbouncer = None
