"""Safe failure: a backend that cannot be read keeps its last verdict and says so in a
condition; nothing is lifted, reset or announced, and the next pass after it is back converges.

Each fault is real: servers of a devstack of this module's own are killed and started
again on the same ports (tests/fault_helpers.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase.backends.mongo import MongoBackend
from dynabase.backends.railway import OwnService, RailwayBackend
from dynabase.backends.railway.client import RailwayAuth, RailwayClient
from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.effective import BillingEffective
from dynabase.desired.overage import carried_overage, decide_overage, usage_outcome
from dynabase.engine.reconciler import Engine
from dynabase.engine.runtime import close_engine
from dynabase.engine.stores import MemoryStatusStore
from dynabase.spec.tenant import UsageStatus

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .fault_helpers import (
    Faults,
    condition,
    devstack,
    faulty_engine,
    faulty_stack,
    metered,
    one,
    published,
    role_config,
    tenant,
    with_tier,
)
from .railway.fake import FakeRailway


@pytest.fixture(scope="module")
def faults(stack: Stack) -> Iterator[Faults]:
    with faulty_stack() as own:
        yield own


@pytest_asyncio.fixture(loop_scope="session")
async def engine(faults: Faults) -> AsyncIterator[tuple[Engine, FakeClock, MemoryStatusStore]]:
    async with faulty_engine(faults) as built:
        yield built


# -- pure: what a pass that cannot read the usage decides -----------------------------------

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def billing(*, overage: float | None = None) -> BillingEffective:
    return BillingEffective(included_vcpu_hours=5.0, overage_per_vcpu_hour_usd=overage,
                            overage_restriction="readOnly")  # the default soft period: 7 days


def test_a_carried_verdict_keeps_level_clock_and_restriction_and_follows_only_the_rules() -> None:
    over = decide_overage(billing(), 6.0, None, NOW)
    assert over is not None and over.status.over_since == NOW and over.restriction is None
    carried = carried_overage(billing(), over.status, NOW + dt.timedelta(days=1), "ConnectionError: down")
    assert carried is not None and carried.status == over.status and carried.ratio is None
    assert carried.unknown == "ConnectionError: down" and "usage unknown" in carried.message
    judged = usage_outcome(carried, billing(), over.status)
    assert (judged.ok, judged.reason, judged.advisory, judged.events) == (False, "UsageUnknown", True, ())
    # Usage only grows within a month: a soft period that ends while it is unknown still ends.
    late = carried_overage(billing(), over.status, NOW + dt.timedelta(days=8), "down")
    assert late is not None and late.restriction == "readOnly" and late.status.over_since == NOW
    restricted = usage_outcome(late, billing(), over.status)
    assert [r for _, r, _ in restricted.events] == ["UsageRestricted"]
    # Still restricted, still unknown: nothing changes, nothing is announced.
    again = carried_overage(billing(), late.status, NOW + dt.timedelta(days=9), "down")
    assert again is not None and usage_outcome(again, billing(), late.status).events == ()
    # Rules that need no usage: an upgrade to a tier that sells overage, a new month.
    upgraded = carried_overage(billing(overage=0.2), late.status, NOW + dt.timedelta(days=9), "down")
    assert upgraded is not None and upgraded.restriction is None and upgraded.status.level == "100"
    december = carried_overage(billing(), late.status, dt.datetime(2026, 12, 1, 0, 5, tzinfo=dt.UTC), "down")
    assert december is not None and december.status == UsageStatus(month="2026-12")
    assert carried_overage(BillingEffective(included_vcpu_hours=0), late.status, NOW, "down") is None


# -- usage and activity that cannot be read ------------------------------------------------


async def test_unreadable_usage_keeps_restrictions_their_clock_and_says_why(
        faults: Faults, engine: tuple[Engine, FakeClock, MemoryStatusStore], stack: Stack) -> None:
    eng, clock, _ = engine
    eng.redis = RedisBackend(stack.env["DYNABASE_REDIS_URL"])  # tenants' Redis is another server: it stays up
    url, dsn = faults.env["DYNABASE_REDIS_URL"], faults.env["DYNABASE_POSTGRES_DSN"]
    slow, read_only = tenant("TINY"), tenant("TINYRO")
    for t in (slow, read_only):
        await metered(url, t, clock.now, 100.0)  # 42 vCPU-seconds: over the 36 included
        over = await one(eng, t)
        assert over.status is not None and over.status.usage is not None and over.status.usage.level == "100"
    clock.advance(minutes=2)  # past the soft period
    restricted = {t.key: await one(eng, t) for t in (slow, read_only)}
    assert (await published(url, slow.database_name))["qps"] == 2
    assert "default_transaction_read_only=on" in await role_config(dsn, read_only.database_name)

    async with faults.down("redis"):
        clock.advance(minutes=5)
        blind = {t.key: await one(eng, t) for t in (slow, read_only)}
        for t in (slow, read_only):
            before, now = restricted[t.key].status, blind[t.key]
            assert before is not None and now.status is not None
            assert now.events == []  # nothing lifted, nothing announced
            assert before.usage is not None and now.restriction == before.usage.restriction is not None
            assert now.status.usage == before.usage  # level, over-since and restriction, unchanged
            usage_now, usage_before = condition(now.status, "UsageWithinPlan"), condition(before, "UsageWithinPlan")
            assert (usage_now.status, usage_now.reason) == ("False", "UsageUnknown")
            assert usage_now.last_transition_time == usage_before.last_transition_time
            assert "usage unknown" in usage_now.message and "ConnectionError" in usage_now.message
            assert condition(now.status, "ProxyReady").reason == "ObserveFailed"
            assert condition(now.status, "RedisReady").status == "True"  # the tenants' Redis is another server
            assert (now.status.applied_tier, now.status.history) == (before.applied_tier, before.history)
        assert "default_transaction_read_only=on" in await role_config(dsn, read_only.database_name)
        clock.advance(days=1)
        later = await one(eng, read_only)
        assert later.status is not None and later.status.usage == restricted[read_only.key].status.usage  # type: ignore[union-attr]

    # Back without its data (no persistence): the usage this process read stays the floor.
    for t in (slow, read_only):
        back = await one(eng, t)
        assert back.events == [] and back.ready, back.outcomes
        assert back.status is not None and back.status.usage == restricted[t.key].status.usage  # type: ignore[union-attr]
        assert condition(back.status, "UsageWithinPlan").reason == "Restricted"
    assert (await published(url, slow.database_name))["qps"] == 2
    assert "default_transaction_read_only=on" in await role_config(dsn, read_only.database_name)
    await eng.redis.close()
    eng.redis = None


async def test_unreadable_activity_keeps_cold_tenants_cold_without_events(
        faults: Faults, engine: tuple[Engine, FakeClock, MemoryStatusStore]) -> None:
    eng, clock, _ = engine
    nap, awake_one = tenant("NAP"), tenant("NAP")
    assert (await one(eng, nap)).status.phase == "Active"  # type: ignore[union-attr]
    clock.advance(seconds=5)  # no query since its tier was applied: idle past its 1s idleTimeout
    cold = await one(eng, nap)
    assert cold.status is not None and cold.status.phase == "Cold"
    assert ("Normal", "TenantCold") in [(k, r) for k, r, _ in cold.events]
    active = await one(eng, awake_one)
    assert active.status is not None and active.status.phase == "Active"

    async with faults.down("redis"):
        clock.advance(seconds=5)
        blind, still_active = await one(eng, nap), await one(eng, awake_one)
        assert blind.cold and blind.events == []  # no TenantWoke
        awake = condition(blind.status, "Awake")
        assert (awake.status, awake.reason) == ("False", "ActivityUnknown") and "stays Cold" in awake.message
        assert awake.last_transition_time == condition(cold.status, "Awake").last_transition_time
        assert condition(blind.status, "ProxyReady").reason == "ObserveFailed"
        assert blind.status is not None and blind.status.phase == "Degraded"  # Ready=False, not Active
        # An Active tenant whose activity is unknown does not go Cold either.
        assert not still_active.cold and still_active.events == []
        assert condition(still_active.status, "Awake").reason == "ActivityUnknown"

    back = await one(eng, nap)
    assert back.cold and back.events == [] and back.ready, back.outcomes  # no second TenantCold
    assert back.status is not None and back.status.phase == "Cold"
    assert condition(back.status, "Awake").reason == "IdleTimeout"
    assert (await published(faults.env["DYNABASE_REDIS_URL"], nap.database_name))["cold"] is True


# -- a backend that cannot be read keeps the tier it recorded -------------------------------


async def test_unreadable_postgres_keeps_the_tier_record_and_the_next_pass_applies_it(
        faults: Faults, engine: tuple[Engine, FakeClock, MemoryStatusStore]) -> None:
    eng, _, _ = engine
    low = tenant("LOW")
    first = await one(eng, low)
    assert first.status is not None and first.status.applied_tier == "LOW"
    hot = with_tier(low, "HOT")

    async with faults.down("postgres"):
        blind = await one(eng, hot)
        assert blind.events == [], blind.events  # no TierApplied, no apply failure
        assert condition(blind.status, "PostgresReady").reason == "ObserveFailed"
        assert blind.status is not None and blind.status.applied_tier == "LOW"
        assert blind.status.history == first.status.history and blind.status.phase == "Degraded"

    back = await one(eng, hot)
    assert back.ready, back.outcomes
    assert back.status is not None and back.status.applied_tier == "HOT"
    assert [(k, r) for k, r, _ in back.events] == [("Normal", "TierApplied")]
    assert [(c.from_tier, c.to_tier) for c in back.status.history][-1] == ("LOW", "HOT")
    conn = await asyncpg.connect(faults.env["DYNABASE_POSTGRES_DSN"])
    try:
        assert await conn.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", low.database_name) == 9
    finally:
        await conn.close()


@pytest.mark.mongo
async def test_unreadable_mongo_keeps_the_tier_record(stack: Stack) -> None:
    stack.need("ferretdb")
    with devstack(["ferretdb"]) as own:
        faults = Faults(own)
        eng, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
        eng.mongo = MongoBackend(faults.env["DYNABASE_MONGO_URL"])
        try:
            low = tenant("LOW")
            first = await one(eng, low)
            assert first.ready, first.outcomes
            async with faults.down("ferretdb"):
                blind = await one(eng, with_tier(low, "HOT"))
                assert blind.events == [] and condition(blind.status, "MongoReady").reason == "ObserveFailed"
                assert blind.status is not None and blind.status.applied_tier == "LOW"
            back = await one(eng, with_tier(low, "HOT"))
            assert back.ready, back.outcomes
            assert back.status is not None and back.status.applied_tier == "HOT"
            assert [(k, r) for k, r, _ in back.events] == [("Normal", "TierApplied")]
        finally:
            await close_engine(eng)


async def test_railway_answering_429_then_500_keeps_the_service_and_announces_nothing(stack: Stack) -> None:
    fake = FakeRailway("tok")
    await fake.start()
    fake.add_service("env-1", "proj-1", "app")
    eng, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    client = RailwayClient(RailwayAuth("tok"), url=fake.url, attempts=2, max_wait=5)
    eng.railway = RailwayBackend(client, own=OwnService(None, None))
    low = tenant("LOW", railway={"projectId": "proj-1", "environmentId": "env-1", "serviceName": "app"})
    try:
        first = await one(eng, low)
        assert first.ready, first.outcomes
        fake.reset_counts()
        fake.fail_next(429, retry_after=600)  # longer than the client waits: the read fails at once
        limited = await one(eng, with_tier(low, "HOT"))
        fake.fail_next(500, times=2)  # every attempt
        failing = await one(eng, with_tier(low, "HOT"))
        for blind in (limited, failing):
            assert blind.events == [], blind.events
            assert condition(blind.status, "RailwayReady").reason == "ObserveFailed"
            assert blind.status is not None and blind.status.applied_tier == "LOW"
        assert fake.mutations == []
        # A service's limits that cannot be read are a failed read too: no apply-failure Event.
        eng.railway.limits_refresh = 0
        fake.fail_next(500, times=2, operation="ServiceLimits")
        limits_unread = await one(eng, with_tier(low, "HOT"))
        assert limits_unread.events == [] and condition(limits_unread.status, "RailwayReady").reason == "ObserveFailed"
        back = await one(eng, with_tier(low, "HOT"))
        assert back.ready, back.outcomes
        assert back.status is not None and back.status.applied_tier == "HOT"
    finally:
        await close_engine(eng)
        await fake.stop()


# -- the tenants' Redis: the quota's read-only verdict ---------------------------------------


async def test_tenant_redis_down_or_unmeasured_keeps_an_over_quota_user_read_only(stack: Stack) -> None:
    with devstack(["redis"]) as own:
        faults = Faults(own)
        url = faults.env["DYNABASE_REDIS_URL"]
        eng, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
        eng.redis = RedisBackend(url)
        low = tenant("LOW")
        username = f"tenant_{low.database_name}"
        admin = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            await one(eng, low)
            tenant_client = aioredis.Redis.from_url(url, username=username, password=secrets.passwords[low.key],
                                                    decode_responses=True)
            await tenant_client.mset({f"t:{low.database_name}:{i}": "v" for i in range(8)})  # over its 5 keys
            await tenant_client.aclose()
            over = await one(eng, low)
            assert condition(over.status, "RedisReady").reason == "QuotaExceeded"
            # As rules, not text: Redis 7.0 reorders single-command rules (its command dict rehashes).
            read_only_rules = sorted((await admin.acl_getuser(username))["commands"])

            # A reconciler that has not counted the keys yet (just started) keeps the verdict.
            await eng.redis.close()
            eng.redis = RedisBackend(url, scan_budget=1, scan_count=2)
            unmeasured = await one(eng, low)
            assert unmeasured.events == [], unmeasured.events  # no RedisQuotaRestored
            assert condition(unmeasured.status, "RedisReady").reason == "QuotaUnknown"
            assert sorted((await admin.acl_getuser(username))["commands"]) == read_only_rules
            await admin.aclose()

            async with faults.down("redis"):
                blind = await one(eng, low)
                assert blind.events == [] and condition(blind.status, "RedisReady").reason == "ObserveFailed"
            admin = aioredis.Redis.from_url(url, decode_responses=True)
            # The ACL file kept the user as it was: nothing was lifted while Redis was away.
            assert sorted((await admin.acl_getuser(username))["commands"]) == read_only_rules
            # The restart lost the keys (no persistence): once the census has counted them (an empty
            # keyspace takes one pass), the quota is met again, which is a change, and announced.
            back = await one(eng, low)
            assert condition(back.status, "RedisReady").status == "True", back.outcomes
            assert ("Normal", "RedisQuotaRestored") in [(k, r) for k, r, _ in back.events]
        finally:
            await admin.aclose()
            await close_engine(eng)
