"""Admission and the proxy's parts around it, without sockets or Redis: the shared limiter's
leases and waiting queries (with a scripted coordination), the timeout sweep, hourly metering,
draining order, and the Redis keyspace codecs."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from dynabase import keyspace
from dynabase.desired.drain import over_cap
from dynabase.desired.proxy import ProxyTenantLimits, QpsBudget
from dynabase.proxy.admission import HOLD, SharedLimiter, queue_budget
from dynabase.proxy.coordination import LocalOnly
from dynabase.proxy.limiter import lease_ahead
from dynabase.proxy.metering import HourlyMeter, Usage
from dynabase.proxy.server import SWEEP_ERRORS, Proxy
from dynabase.proxy.tenants import ProxyConfig, Tenants

from .test_proxy_stream import connection, message


def limits(qps: int | None = 10, *, over_limit: str = "throttle", queue_ms: int = 2000) -> ProxyTenantLimits:
    return ProxyTenantLimits("t/t", "t", "t", "T", "p", 10, qps, qps, queue_ms, over_limit, None, None)


def budget(qps: int = 10, *, over_limit: str = "throttle", queue_ms: int = 2000) -> QpsBudget:
    return QpsBudget.of(limits(qps, over_limit=over_limit, queue_ms=queue_ms))


class ScriptedCoordination(LocalOnly):
    """Connected replicas whose lease answers the test gives, one call at a time."""

    def __init__(self) -> None:
        self.connected = True
        self.asked: list[list[float]] = []
        self.answers: asyncio.Queue[list[int] | None] = asyncio.Queue()

    async def lease(self, owner: str, lanes: int, args: list[float]) -> list[int] | None:
        self.asked.append(args)
        answer = await self.answers.get()
        if answer is None:
            self.connected = False
        return answer


class Waiter:
    def __init__(self, deadline: float = float("inf")) -> None:
        self.hold_deadline = deadline
        self.released: list[bool] = []
        self.woken = asyncio.Event()

    def release(self, reject: bool = False) -> None:
        self.released.append(reject)
        self.woken.set()


async def answered(limiter: SharedLimiter, answer: list[int] | None) -> None:
    """Answer the lease in flight and wait until the limiter has taken the answer."""
    assert isinstance(limiter.coordination, ScriptedCoordination) and limiter.lease_task is not None
    limiter.coordination.answers.put_nowait(answer)
    await limiter.lease_task


async def test_the_queue_budget_and_lease_horizon_come_from_the_limits_once() -> None:
    throttled = SharedLimiter(budget(over_limit="throttle", queue_ms=2000), 1, ScriptedCoordination())
    assert (throttled.budget, throttled.ahead) == (2.0, lease_ahead(2.0)) == (queue_budget(budget(queue_ms=2000)), 2.0)
    refused = SharedLimiter(budget(over_limit="reject", queue_ms=2000), 1, ScriptedCoordination())
    assert (refused.budget, refused.ahead) == (0.0, lease_ahead(0.0))
    refused.retune(budget(over_limit="throttle", queue_ms=500))
    assert refused.budget == 0.5


async def test_a_query_without_a_slot_waits_for_the_lease_and_then_goes() -> None:
    coordination = ScriptedCoordination()
    limiter = SharedLimiter(budget(), 1, coordination)
    assert limiter.admit(time.monotonic(), 0.0) == HOLD  # nothing leased yet: hold, and a lease is asked for
    waiter = Waiter()
    limiter.waiters.append(waiter)
    lease = limiter.lease_task
    assert limiter.admit(time.monotonic(), 0.0) == HOLD and limiter.lease_task is lease  # one lease at a time
    await answered(limiter, [1, 10, 0])  # lane 1: ten slots from now
    assert len(coordination.asked) == 1
    assert waiter.released == [False]  # it asks again...
    assert limiter.admit(time.monotonic(), 0.0) == 0.0  # ...and goes


async def test_when_the_replicas_lose_each_other_waiting_queries_decide_locally() -> None:
    limiter = SharedLimiter(budget(), 1, ScriptedCoordination())
    assert limiter.admit(time.monotonic(), 0.0) == HOLD
    waiter = Waiter()
    limiter.waiters.append(waiter)
    await answered(limiter, None)  # Redis out of reach
    assert waiter.released == [False] and not limiter.waiters
    assert limiter.admit(time.monotonic(), 0.0) == 0.0  # from the local share, at once


async def test_a_full_schedule_refuses_those_who_cannot_wait_and_retries_for_the_others() -> None:
    limiter = SharedLimiter(budget(qps=100), 1, ScriptedCoordination())
    assert limiter.admit(time.monotonic(), 0.0) == HOLD
    patient, hurried = Waiter(), Waiter(deadline=time.monotonic())
    limiter.waiters += [patient, hurried]
    await answered(limiter, [0, 50_000])  # every lane booked: room in 50 ms
    assert hurried.released == [True]  # refused: the room comes after its deadline
    assert patient.released == [] and limiter.waiters == [patient]
    await asyncio.wait_for(patient.woken.wait(), 30)  # released when there is room: it asks again
    assert patient.released == [False]


async def test_new_limits_release_the_queries_waiting_on_the_old_ones() -> None:
    tenants = Tenants(ScriptedCoordination())
    tenants.limits = {"t": limits(qps=10)}
    state = tenants.get("t")
    assert state is not None and state.limiter is not None
    waiter = Waiter()
    state.limiter.waiters.append(waiter)
    tenants.limits = {"t": limits(qps=10, queue_ms=100)}  # the same rate: the limiter stays, retuned
    tenants.applied(["t"])
    assert waiter.released == [] and state.limiter.budget == 0.1
    tenants.limits = {"t": limits(qps=None)}  # no limit any more
    tenants.applied(["t"])
    assert waiter.released == [False] and state.limiter is None


async def test_a_held_query_goes_through_the_connection_once_its_lease_answers() -> None:
    conn, _, to_server = connection(10, over_limit="throttle", tenants=Tenants(ScriptedCoordination()))
    query = message(b"Q", 20)
    conn.data_received(query)
    assert bytes(to_server.data) == b"" and conn.held == query  # held, reading paused
    assert conn.tenant is not None and conn.tenant.limiter is not None
    await answered(conn.tenant.limiter, [1, 10, 0])
    assert bytes(to_server.data) == query and conn.held is None
    assert conn.tenant.usage.queries == 1 and conn.tenant.usage.throttled == 1


async def test_the_sweep_counts_and_logs_a_failing_check_and_checks_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    proxy = Proxy(ProxyConfig())
    checked: list[str] = []

    class Broken:
        def check_timeouts(self, now: float) -> None:
            raise RuntimeError("a bug")

    class Fine:
        def check_timeouts(self, now: float) -> None:
            checked.append("fine")

    proxy.connections |= {Broken(), Broken(), Fine()}  # type: ignore[arg-type]
    errors = SWEEP_ERRORS._value.get()
    with caplog.at_level(logging.ERROR):
        assert proxy.sweep(100.0) == 2
        assert proxy.sweep(101.0) == 2  # the next sweep goes on
    assert checked == ["fine", "fine"]
    assert SWEEP_ERRORS._value.get() - errors == 4
    assert [r.message for r in caplog.records] == ["checking a connection's timeouts failed"]  # once a minute


def test_what_is_counted_between_two_hours_flushes_belongs_to_the_hour_that_ended() -> None:
    meter, usage = HourlyMeter(), Usage("t/t", "T")
    usage.queries = 5
    assert meter.per_hour(usage, 10 * 3600 + 3590) == [(10, pytest.approx(_counts(queries=5)))]
    meter.flushed()
    usage.queries = 8  # 3 more before the hour ends, flushed only after it
    assert meter.per_hour(usage, 11 * 3600 + 1) == [(10, _counts(queries=8)), (11, _counts())]
    usage.queries = 9  # the flush failed: the ended hour is written again
    assert meter.per_hour(usage, 11 * 3600 + 2) == [(10, _counts(queries=8)), (11, _counts(queries=1))]
    meter.flushed()
    assert meter.per_hour(usage, 11 * 3600 + 3) == [(11, _counts(queries=1))]


def _counts(**values: float) -> dict[str, float]:
    return {name: values.get(name, 0) for name in Usage.FIELDS}


def test_idle_connections_end_first_then_the_newest() -> None:
    sessions = [("busy old", False, 1.0), ("idle old", True, 2.0), ("busy new", False, 3.0), ("idle new", True, 4.0)]
    ended = over_cap(sessions, 1, idle=lambda s: s[1], started=lambda s: s[2])
    assert [s[0] for s in ended] == ["idle new", "idle old", "busy new"]
    assert over_cap(sessions, 4, idle=lambda s: s[1], started=lambda s: s[2]) == []


def test_the_keyspace_codecs_round_trip_and_name_what_is_wrong() -> None:
    published = limits(qps=5)
    assert keyspace.decode_limits(keyspace.encode_limits(published)) == published
    newer = json.loads(keyspace.encode_limits(published)) | {"someday": 1}  # a newer engine's field
    assert keyspace.decode_limits(json.dumps(newer)) == published
    table, unreadable = keyspace.decode_limits_table({
        "t": keyspace.encode_limits(published), "old": json.dumps({"tenant": "x"}), "bad": "[]",
        "no-burst": keyspace.encode_limits(published).replace('"burst":5', '"burst":null'),
    })
    assert table == {"t": published}
    assert unreadable["old"].startswith("proxy limits lack burst, database,") and "JSON object" in unreadable["bad"]
    assert "qps 5 without a burst" in unreadable["no-burst"]
    assert keyspace.changed_databases(keyspace.encode_changed(["a", "b"])) == ["a", "b"]
    assert keyspace.decode_cancel_target(keyspace.encode_cancel_target(("::1", 6432))) == ("::1", 6432)
    assert keyspace.decode_cancel_target("nonsense") is None
    fields = {keyspace.usage_field("ns/t", "r1"): keyspace.encode_usage({"queries": 3, "query_seconds": 0.5}, "PRO")}
    (sample,) = keyspace.decode_usage(fields)
    assert (sample.tenant, sample.replica, sample.tier, sample.counters) == (
        "ns/t", "r1", "PRO", {"queries": 3, "query_seconds": 0.5})
    assert keyspace.usage_hour(keyspace.usage_key(491_000)) == 491_000
    report = keyspace.AgentReport("a1", "v1", 12.5, 3, {"p": keyspace.PoolReport(6432, False, ["pool_size is 1"])})
    assert keyspace.decode_agent_report("a1", keyspace.encode_agent_report(report)) == report
    assert report.pool_ok("p") == (False, "agent a1 pool p: pool_size is 1") and report.ports() == {"p": 6432}
