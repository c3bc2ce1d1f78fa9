"""Included usage and overage: warnings, the soft-overage period, then a restriction
until an upgrade — pure decisions, and the engine on the real Postgres and Redis."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.effective import BillingEffective
from dynabase.desired.overage import decide_overage
from dynabase.engine import metrics
from dynabase.engine.reconciler import Engine, TenantResult
from dynabase.engine.runtime import close_engine
from dynabase.keyspace import LIMITS_KEY, usage_field, usage_key
from dynabase.keyspace import encode_usage as encode
from dynabase.spec import TenantDatabase, TierPolicy
from dynabase.spec.tenant import UsageStatus

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def billing(included: float = 5.0, overage: float | None = None, restriction: str = "qps") -> BillingEffective:
    return BillingEffective(included_vcpu_hours=included, overage_per_vcpu_hour_usd=overage,
                            overage_restriction=restriction)


def test_thresholds_soft_period_and_restriction() -> None:
    free = billing()
    assert decide_overage(billing(included=0), 100, None, NOW) is None  # nothing included: nothing to judge
    quiet = decide_overage(free, 1.0, None, NOW)
    assert quiet is not None and quiet.status == UsageStatus(month="2026-11")
    warn = decide_overage(free, 4.0, quiet.status, NOW)
    assert warn is not None and warn.status.level == "80" and warn.restriction is None
    over = decide_overage(free, 5.5, warn.status, NOW)
    assert over is not None and over.status.level == "100" and over.status.over_since == NOW
    assert over.restriction is None and "restricted from 2026-11-27 12:00Z" in over.message
    day6 = decide_overage(free, 6.0, over.status, NOW + dt.timedelta(days=6))
    assert day6 is not None and day6.restriction is None and day6.status.over_since == NOW
    day7 = decide_overage(free, 6.0, day6.status, NOW + dt.timedelta(days=7))
    assert day7 is not None and day7.restriction == "qps" and "1 queries/s" in day7.message
    next_month = decide_overage(free, 0.0, day7.status, dt.datetime(2026, 12, 1, 0, 5, tzinfo=dt.UTC))
    assert next_month is not None and next_month.status == UsageStatus(month="2026-12")


def test_a_tier_that_sells_overage_is_never_restricted() -> None:
    starter = billing(overage=0.15)
    over = decide_overage(starter, 50, None, NOW)
    later = decide_overage(starter, 80, over.status if over else None, NOW + dt.timedelta(days=20))
    assert later is not None and later.status.level == "100" and later.restriction is None
    assert "billed at 0.15 USD" in later.message


# -- the engine ---------------------------------------------------------------------

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "overage"},
    "spec": {"tiers": {
        # 0.01 vCPU-hours = 36 vCPU-seconds included; soft period of a minute for the test.
        "TINY": {"rank": 0, "proxy": {"qps": 50},
                 "billing": {"includedVcpuHours": 0.01, "softOveragePeriod": "1m", "restrictedQps": 2}},
        "TINYRO": {"rank": 1, "proxy": {"qps": 50},
                   "billing": {"includedVcpuHours": 0.01, "softOveragePeriod": "1m",
                               "overageRestriction": "readOnly"}},
        "PAID": {"rank": 2, "proxy": {"qps": 50},
                 "billing": {"includedVcpuHours": 0.01, "overagePerVcpuHourUSD": 0.2}},
    }},
})
POLICIES = {"overage": POLICY}


def tenant(tier: str, db: str) -> TenantDatabase:
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "overage", "generation": 1},
        "spec": {"orgId": "org", "tier": tier, "tierPolicyRef": "overage", "databaseName": db},
    })


@pytest_asyncio.fixture(loop_scope="session")
async def env(stack: Stack) -> AsyncIterator[dict[str, Any]]:
    clock = FakeClock()
    clock.now = dt.datetime.now(dt.UTC)
    engine, secrets, statuses = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    redis = aioredis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    written: list[tuple[str, str]] = []

    async def metered(t: TenantDatabase, query_seconds: float) -> None:
        """Usage as a proxy replica flushes it: 0.42 vCPU-s per query-second in the default model."""
        key = usage_key(int(clock.now.timestamp()) // 3600)
        field = usage_field(t.key, "r1")
        await redis.hset(key, field, encode({"queries": 100, "query_seconds": query_seconds, "connections": 1},
                                            t.spec.tier))
        written.append((key, field))

    try:
        yield {"engine": engine, "clock": clock, "secrets": secrets, "statuses": statuses, "metered": metered,
               "redis": redis, "stack": stack}
    finally:
        for key, field in written:
            await redis.hdel(key, field)
        await redis.aclose()
        await close_engine(engine)


async def one(engine: Engine, t: TenantDatabase) -> TenantResult:
    return (await engine.reconcile_all(POLICIES, [t])).tenants[0]


def usage_condition(result: TenantResult) -> Any:
    return next(o for o in result.outcomes if o.condition_type == "UsageWithinPlan")


async def test_over_included_usage_is_restricted_after_the_soft_period_and_lifted_by_an_upgrade(
        env: dict[str, Any]) -> None:
    engine, clock, statuses = env["engine"], env["clock"], env["statuses"]
    db = f"ov_{uuid.uuid4().hex[:6]}"
    t = tenant("TINY", db)
    await env["metered"](t, 100.0)  # 42 vCPU-seconds estimated: over the 36 included
    first = await one(engine, t)
    assert first.ready and usage_condition(first).reason == "OverIncludedUsage"
    assert first.status is not None and first.status.usage is not None
    assert first.status.usage.level == "100" and first.status.usage.restriction is None
    assert ("Warning", "IncludedUsageExceeded") in [(k, r) for k, r, _ in first.events]
    assert json.loads(await env["redis"].hget(LIMITS_KEY, db))["qps"] == 50

    writes = statuses.writes
    steady = await one(engine, t)  # nothing crossed: no status write, no event
    assert statuses.writes == writes and steady.events == []

    clock.advance(minutes=2)
    restricted = await one(engine, t)
    assert usage_condition(restricted).reason == "Restricted" and restricted.ready
    assert ("Warning", "UsageRestricted") in [(k, r) for k, r, _ in restricted.events]
    limits = json.loads(await env["redis"].hget(LIMITS_KEY, db))
    assert (limits["qps"], limits["burst"]) == (2, 2)
    assert metrics.USAGE_RESTRICTED.labels(t.key, "TINY", "qps")._value.get() == 1

    paid = tenant("PAID", db)  # the upgrade: overage is billed now, never restricted
    lifted = await one(engine, paid)
    assert usage_condition(lifted).reason == "OverageBilled"
    assert ("Normal", "UsageRestrictionLifted") in [(k, r) for k, r, _ in lifted.events]
    assert json.loads(await env["redis"].hget(LIMITS_KEY, db))["qps"] == 50
    assert (t.key, "TINY", "qps") not in metrics._restricted.labels.values()


async def test_read_only_restriction_refuses_writes_in_postgres(env: dict[str, Any]) -> None:
    engine, clock, stack = env["engine"], env["clock"], env["stack"]
    db = f"ovro_{uuid.uuid4().hex[:6]}"
    t = tenant("TINYRO", db)
    await env["metered"](t, 1000.0)
    await one(engine, t)
    clock.advance(minutes=2)
    result = await one(engine, t)
    assert result.status is not None and result.status.usage is not None
    assert result.status.usage.restriction == "readOnly"
    password = env["secrets"].passwords[t.key]
    conn = await asyncpg.connect(host="127.0.0.1", port=int(stack.env["PGPORT"]), user=db, password=password,
                                 database=db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_class") > 0  # reads still work
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("CREATE TABLE t (x int)")
    finally:
        await conn.close()



async def test_month_to_date_usage_sums_the_months_hours_and_only_them(env: dict[str, Any]) -> None:
    engine, clock, redis = env["engine"], env["clock"], env["redis"]
    clock.now = dt.datetime(2001, 3, 15, 12, 30, tzinfo=dt.UTC)  # far from now: no proxy writes there
    db = f"ovm_{uuid.uuid4().hex[:6]}"
    t = tenant("TINY", db)
    field = usage_field(t.key, "r1")

    def hour(moment: dt.datetime) -> str:
        return usage_key(int(moment.timestamp()) // 3600)

    # 30 + 30 query-seconds this month (0.42 vCPU-s each: 25.2 of 36 included, under 80 %),
    # 1000 in February that must not count.
    writes = {hour(dt.datetime(2001, 2, 28, 23, tzinfo=dt.UTC)): 1000.0,
              hour(dt.datetime(2001, 3, 1, 0, tzinfo=dt.UTC)): 30.0,
              hour(clock.now): 30.0}
    for key, seconds in writes.items():
        await redis.hset(key, field, encode({"queries": 10, "query_seconds": seconds}, "TINY"))
    try:
        first = await one(engine, t)
        assert first.overage is not None and first.overage.ratio == pytest.approx(25.2 / 36)
        assert first.status is not None and first.status.usage is not None and first.status.usage.level is None
        # A later hour adds to the hours already summed (read once, kept).
        clock.advance(hours=3)
        later = hour(clock.now)
        writes[later] = 20.0
        await redis.hset(later, field, encode({"queries": 10, "query_seconds": 20.0}, "TINY"))
        second = await one(engine, t)
        assert second.overage is not None and second.overage.ratio == pytest.approx(33.6 / 36)
        assert second.status is not None and second.status.usage is not None
        assert second.status.usage.level == "80"
        assert ("Warning", "UsageWarning") in [(k, r) for k, r, _ in second.events]
    finally:
        for key in writes:
            await redis.hdel(key, field)


def test_usage_ratio_series_follow_the_tenants_tier() -> None:
    def series() -> dict[tuple[str, ...], float]:
        return {tuple(s.labels.values()): s.value for m in metrics.USAGE_LEVEL.collect() for s in m.samples
                if s.labels.get("tenant") == "ns/moving"}

    metrics.set_usage_ratio("ns/moving", "FREE", 0.5)
    metrics.set_usage_ratio("ns/other", "FREE", 0.1)  # a partial pass elsewhere leaves it alone
    assert series() == {("ns/moving", "FREE"): 0.5}
    metrics.set_usage_ratio("ns/moving", "STARTER", 0.2)
    assert series() == {("ns/moving", "STARTER"): 0.2}
    metrics.set_usage_ratio("ns/moving", "", None)
    assert series() == {}
    metrics.set_usage_ratio("ns/other", "", None)
