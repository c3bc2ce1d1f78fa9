"""Notifications: the engine's events kept in Postgres by headless mode, and sent from there as signed
webhooks to a receiver on loopback that checks signatures and fails the first attempts — at 80 % and
100 % of the included usage, a restriction and its end, coldWarning before Cold, tier changes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml

from dynabase.backends.events_pg import PostgresEventLog, StoredEvent
from dynabase.backends.notify_pg import NotificationLedger, OutboxEntry
from dynabase.backends.proxy import ProxyBackend
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine
from dynabase.events import webhook
from dynabase.events.delivery import Deliverer, Endpoint, NotifySettings, declared_endpoints, webhook_secret_variable
from dynabase.events.pipeline import event_pipeline
from dynabase.headless.http import serve
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource
from dynabase.keyspace import ACTIVITY_KEY, encode_usage, usage_field, usage_key

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .webhook_receiver import receiving

pytestmark = pytest.mark.asyncio(loop_scope="session")
FAST = NotifySettings(first_retry=0.05, max_retry=0.2, max_attempts=5, timeout=5.0, lease=5.0, poll=0.2)
POLICY = {
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "notify"},
    "spec": {"tiers": {
        # 0.01 vCPU-hours = 36 vCPU-seconds included, a soft period of a minute, Cold after 10 idle minutes
        # and a warning 2 minutes before.
        "SMALL": {"rank": 0, "proxy": {"qps": 50},
                  "lifecycle": {"idleTimeout": "10m", "coldWarning": "2m", "downgradeGracePeriod": "15m"},
                  "billing": {"includedVcpuHours": 0.01, "softOveragePeriod": "1m", "restrictedQps": 2}},
        "BIG": {"rank": 1, "proxy": {"qps": 500},
                "billing": {"baseFeeUSD": 50, "includedVcpuHours": 100, "overagePerVcpuHourUSD": 0.12}},
    }},
}


def tenant_manifest(name: str, db: str, tier: str, url: str | None) -> str:
    spec: dict[str, Any] = {"orgId": f"org-{name}", "tier": tier, "tierPolicyRef": "notify", "databaseName": db}
    if url is not None:
        spec["notifications"] = {"url": url}
    return yaml.safe_dump({"apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                           "metadata": {"name": name, "namespace": "notify"}, "spec": spec})


@pytest_asyncio.fixture(loop_scope="session")
async def env(stack: Stack, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    clock = FakeClock()
    clock.now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    redis = aioredis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        yield {"engine": engine, "clock": clock, "folder": tmp_path, "redis": redis, "stack": stack,
               "suffix": uuid.uuid4().hex[:6], "pool": engine.postgres.pool}
    finally:
        await redis.aclose()
        await close_engine(engine)


async def test_each_notified_event_reaches_the_receiver_signed_once_after_retries(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    clock, folder, redis = env["clock"], env["folder"], env["redis"]
    name, db = f"acme-{env['suffix']}", f"nt_acme_{env['suffix']}"
    start = clock.now
    async with receiving("whsec_test_" + env["suffix"]) as receiver:
        (folder / "tenant.yaml").write_text(tenant_manifest(name, db, "SMALL", receiver.url))
        headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=clock)
        headless.events, headless.notifier = event_pipeline(env["pool"], declared_endpoints(headless.tenant), FAST)
        monkeypatch.setenv(webhook_secret_variable(headless.load()[1][0]), receiver.secret)
        key = f"notify/{name}"
        stop = asyncio.Event()
        sender = asyncio.create_task(headless.notifier.run(stop))

        async def metered(query_seconds: float) -> None:
            """Usage as a proxy replica flushes it (0.42 vCPU-s per query-second by default)."""
            await redis.hset(usage_key(int(start.timestamp()) // 3600), usage_field(key, "r1"),
                             encode_usage({"queries": 10, "query_seconds": query_seconds, "connections": 1}, "SMALL"))

        try:
            await redis.zadd(ACTIVITY_KEY, {db: start.timestamp()})  # queried at the start
            await headless.run_once()  # created: tier.applied
            await metered(70.0)  # 0.0082 of 0.01 vCPU-hours: 82 %
            await headless.run_once()
            await metered(90.0)  # 105 %
            await headless.run_once()
            clock.advance(minutes=2)  # the soft period (1m) is over
            await headless.run_once()
            clock.advance(minutes=6, seconds=30)  # idle for 8.5 of 10 minutes: within coldWarning (2m)
            await headless.run_once()
            await headless.run_once()  # still within it: warned once
            (folder / "tenant.yaml").write_text(tenant_manifest(name, db, "BIG", receiver.url))
            await headless.run_once()  # an upgrade: applied at once, and the restriction ends
            (folder / "tenant.yaml").write_text(tenant_manifest(name, db, "SMALL", receiver.url))
            await headless.run_once()  # a downgrade waits out its grace period
            expected = ["tenant.cold_soon", "tier.applied", "tier.applied", "tier.downgrade_scheduled",
                        "usage.exceeded", "usage.restricted", "usage.restriction_lifted", "usage.warning"]
            await receiver.until(lambda: receiver.types() == expected, "every notified event")
        finally:
            stop.set()
            await sender
            await redis.hdel(usage_key(int(start.timestamp()) // 3600), usage_field(key, "r1"))
            await redis.zrem(ACTIVITY_KEY, db)

    # Each event: two refused attempts, then one accepted; every request signed, the same bytes each time.
    by_event: dict[str, list[Any]] = {}
    for request in receiver.requests:
        by_event.setdefault(request.event_id, []).append(request)
    assert set(by_event) == set(receiver.processed) and receiver.duplicates == 0
    for requests in by_event.values():
        assert [(r.attempt, r.answered) for r in requests] == [(1, 500), (2, 500), (3, 200)]
        assert all(r.signature_ok for r in requests) and len({r.body for r in requests}) == 1
    ledger = await NotificationLedger(env["pool"]).deliveries(tenant=key)
    assert sorted((d.status, d.attempts) for d in ledger) == [("delivered", 3)] * 8
    assert all(d.endpoint == receiver.url.rsplit("/hooks", 1)[0] for d in ledger)  # origin only, no path

    # What receivers get.
    warning, = receiver.of_type("usage.warning")
    assert warning["data"]["level"] == 80 and warning["orgId"] == f"org-{name}" and warning["tenant"] == key
    assert warning["data"]["usedVcpuHours"] == pytest.approx(70 * 0.42 / 3600, abs=1e-4)
    restricted, = receiver.of_type("usage.restricted")
    assert restricted["data"]["restriction"] == "qps" and restricted["data"]["restrictedQps"] == 2
    cold_soon, = receiver.of_type("tenant.cold_soon")
    assert cold_soon["data"]["coldAt"] == (start + dt.timedelta(minutes=10)).isoformat()
    assert cold_soon["data"]["coldWarning"] == "2m" and cold_soon["data"]["idleTimeout"] == "10m"
    scheduled, = receiver.of_type("tier.downgrade_scheduled")
    assert (scheduled["data"]["fromTier"], scheduled["data"]["toTier"]) == ("BIG", "SMALL")
    assert [p["data"]["toTier"] for p in sorted(receiver.of_type("tier.applied"), key=lambda p: p["created"])] == \
        ["SMALL", "BIG"]
    print("\n-- payloads --")
    for payload in sorted(receiver.processed.values(), key=lambda p: (p["created"], p["type"])):
        print(json.dumps(payload, sort_keys=True))

    # The history keeps them all (and the events that notify nobody); /status and `dynabase events` show it.
    history = await PostgresEventLog(env["pool"]).recent(tenant=key)
    assert {e.reason for e in history} >= {"TierApplied", "UsageWarning", "IncludedUsageExceeded", "UsageRestricted",
                                           "ColdSoon", "UsageRestrictionLifted", "DowngradeScheduled"}
    assert all(e.delivery == "delivered" for e in history if e.reason in webhook.NOTIFIED)
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dynabase.cli", "events", "--tenant", key, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DYNABASE_POSTGRES_DSN": env["stack"].env["DYNABASE_POSTGRES_DSN"]})
    out, _ = await command.communicate()
    assert command.returncode == 0
    table = out.decode()
    assert "ColdSoon" in table and "delivered" in table and table.count(key) == len(history)


async def test_a_sender_lost_after_the_receiver_answered_sends_again_and_the_receiver_drops_it(
        env: dict[str, Any]) -> None:
    """At least once: a crash between the 2xx and the ledger's update means one more delivery of the
    same event id, which the receiver recognises."""
    pool, suffix = env["pool"], env["suffix"]
    event = StoredEvent(f"evt_crash_{suffix}", f"notify/crash-{suffix}", "org-crash", "crash", "SMALL", "Normal",
                        "TierApplied", "tier SMALL applied (was none)", dt.datetime.now(dt.UTC))
    await PostgresEventLog(pool).append([event], [OutboxEntry(event.id, event.tenant, event.reason,
                                                              webhook.body(event))])

    class LostAfterSending(NotificationLedger):
        async def delivered(self, event_id: str, status: int, endpoint: str) -> None:
            raise ConnectionResetError("the sender died before it wrote down the answer")

    async with receiving("whsec_crash", fail_first=0) as receiver:
        async def endpoint(tenant: str) -> Endpoint | None:
            return Endpoint(receiver.url, receiver.secret) if tenant == event.tenant else None

        settings = NotifySettings(first_retry=0.05, lease=0.3, poll=0.1)
        with pytest.raises(ConnectionResetError):
            await Deliverer(LostAfterSending(pool), endpoint, settings).deliver_due()
        assert [r.event_id for r in receiver.requests] == [event.id]
        second = Deliverer(NotificationLedger(pool), endpoint, settings)
        stop = asyncio.Event()
        task = asyncio.create_task(second.run(stop))  # the next sender, once the first one's lease ran out
        try:
            await receiver.until(lambda: len(receiver.requests) == 2, "the second delivery")
        finally:
            stop.set()
            await task
        assert receiver.duplicates == 1 and list(receiver.processed) == [event.id]
        delivery, = await NotificationLedger(pool).deliveries(tenant=event.tenant)
        assert (delivery.status, delivery.attempts) == ("delivered", 1)
        assert (await second.deliver_due()).delivered == 0  # delivered: never sent again
        assert len(receiver.requests) == 2


async def test_appending_a_pass_twice_keeps_and_notifies_each_event_once(env: dict[str, Any]) -> None:
    pool, suffix = env["pool"], env["suffix"]
    at = dt.datetime.now(dt.UTC)
    events = [StoredEvent(f"evt_twice_{suffix}_{i}", f"notify/twice-{suffix}", "org", "twice", "SMALL", "Warning",
                          "UsageWarning", f"80 % #{i}", at) for i in range(3)]
    outbox = [OutboxEntry(e.id, e.tenant, e.reason, webhook.body(e)) for e in events]
    log = PostgresEventLog(pool)
    assert await log.append(events, outbox) == 3
    assert await log.append(events, outbox) == 0
    assert await log.count(events[0].tenant) == 3
    assert len(await NotificationLedger(pool).deliveries(tenant=events[0].tenant)) == 3


async def test_the_history_is_bounded_per_tenant_in_the_same_transaction(env: dict[str, Any]) -> None:
    pool, suffix = env["pool"], env["suffix"]
    log = PostgresEventLog(pool, keep=5)
    at = dt.datetime.now(dt.UTC)
    busy, quiet = f"notify/busy-{suffix}", f"notify/quiet-{suffix}"
    await log.append([StoredEvent(f"evt_quiet_{suffix}", quiet, None, None, None, "Normal", "TenantCold", "idle", at)])
    for batch in range(4):
        await log.append([StoredEvent(f"evt_busy_{suffix}_{batch}_{i}", busy, None, None, None, "Normal",
                                      "TenantWoke", f"#{batch * 3 + i}", at) for i in range(3)])
    kept = await log.recent(tenant=busy)
    assert [e.message for e in kept] == ["#11", "#10", "#9", "#8", "#7"]  # the newest five, newest first
    assert await log.count(quiet) == 1  # another tenant's history is its own


async def test_a_missing_secret_is_retried_and_a_tenant_without_notifications_any_more_is_cancelled(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, suffix, pool = env["folder"], env["suffix"], env["pool"]
    name = f"nosecret-{suffix}"
    async with receiving("whsec_late", fail_first=0) as receiver:
        (folder / "tenant.yaml").write_text(tenant_manifest(name, f"nt_nosecret_{suffix}", "SMALL", receiver.url))
        headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=env["clock"])
        headless.events, headless.notifier = event_pipeline(pool, declared_endpoints(headless.tenant), FAST)
        await headless.run_once()  # tier.applied queued; no secret yet
        counts = await headless.notifier.deliver_due()
        assert (counts.delivered, counts.retried) == (0, 1) and receiver.requests == []
        delivery, = await NotificationLedger(pool).deliveries(tenant=f"notify/{name}")
        variable = webhook_secret_variable(headless.load()[1][0])
        assert delivery.status == "pending" and delivery.last_error == f"no signing secret: set {variable} " \
                                                                       f"(or {variable}_FILE)"
        monkeypatch.setenv(variable, receiver.secret)
        stop = asyncio.Event()
        sender = asyncio.create_task(headless.notifier.run(stop))  # retries once the backoff has passed
        try:
            await receiver.until(lambda: receiver.types() == ["tier.applied"], "the retried notification")
        finally:
            stop.set()
            await sender

        # A notification queued for a tenant that then drops its notifications is cancelled, not sent.
        (folder / "tenant.yaml").write_text(tenant_manifest(name, f"nt_nosecret_{suffix}", "BIG", receiver.url))
        await headless.run_once()
        (folder / "tenant.yaml").write_text(tenant_manifest(name, f"nt_nosecret_{suffix}", "BIG", None))
        headless.load()
        assert (await headless.notifier.deliver_due()).cancelled == 1
        assert len(receiver.requests) == 1


async def test_a_failed_append_is_kept_and_written_with_the_next_pass(env: dict[str, Any]) -> None:
    """Postgres away for one pass: its events are not lost, and ids keep them single."""
    pool = await asyncpg.create_pool(env["stack"].env["DYNABASE_POSTGRES_DSN"], min_size=1, max_size=1)
    recorder, _ = event_pipeline(pool, declared_endpoints(lambda _key: None), FAST)

    class Result:
        def __init__(self, tenant: Any, events: list[tuple[str, str, str]]) -> None:
            self.tenant, self.key, self.events, self.status, self.limits, self.overage = \
                tenant, tenant.key, events, None, None, None

    from .engine_helpers import make_tenant
    tenant = make_tenant(f"nt_lost_{env['suffix']}", "SMALL")
    first = dt.datetime.now(dt.UTC)
    await pool.close()
    await recorder.record_quietly([Result(tenant, [("Normal", "TenantCold", "idle")])], first)
    recorder.log = PostgresEventLog(env["pool"])
    await recorder.record_quietly([Result(tenant, [("Normal", "TenantWoke", "back")])], first + dt.timedelta(1))
    assert [e.reason for e in await recorder.log.recent(tenant=tenant.key)] == ["TenantWoke", "TenantCold"]


async def test_status_lists_each_tenants_latest_events(env: dict[str, Any]) -> None:
    folder, suffix, pool = env["folder"], env["suffix"], env["pool"]
    name = f"status-{suffix}"
    (folder / "tenant.yaml").write_text(tenant_manifest(name, f"nt_status_{suffix}", "SMALL", "http://127.0.0.1:9/x"))
    headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=env["clock"])
    headless.events, headless.notifier = event_pipeline(pool, declared_endpoints(headless.tenant), FAST)
    await headless.run_once()
    port = free_port()
    runner = await serve(headless, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/status") as response:
            body = await response.json()
    finally:
        await runner.cleanup()
    event, = body["tenants"][f"notify/{name}"]["events"]
    assert (event["reason"], event["type"], event["notification"]) == ("TierApplied", "Normal", "pending")
    assert event["message"] == "tier SMALL applied (was none)" and event["orgId"] == f"org-{name}"
