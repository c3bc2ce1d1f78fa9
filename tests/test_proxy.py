"""The tenant proxy with real clients, in front of the devstack's PgBouncer agent,
Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.engine.reconciler import Engine
from dynabase.engine.runtime import close_engine
from dynabase.keyspace import AGENTS_KEY, LIMITS_KEY, USAGE_PATTERN, cancel_key, decode_limits, decode_usage
from dynabase.proxy.coordinator import Coordinator
from dynabase.proxy.server import Proxy
from dynabase.proxy.tenants import TenantState
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .proxy_helpers import running_proxy

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "proxytest"},
    "spec": {"tiers": {
        "LIM": {"rank": 0,
                "postgres": {"connectionLimit": 10, "statementTimeout": "1s", "idleInTransactionSessionTimeout": "1s"},
                "pgbouncer": {"poolSize": 3, "poolMode": "transaction"},
                "proxy": {"maxConnections": 3, "qps": 5, "burst": 5, "overLimit": "reject", "queueTimeout": "1s"}},
        "THR": {"rank": 1, "postgres": {"connectionLimit": 20},
                "pgbouncer": {"poolSize": 4},
                "proxy": {"maxConnections": 10, "qps": 10, "burst": 10, "overLimit": "throttle",
                          "queueTimeout": "5s"}},
        "BIG": {"rank": 2, "postgres": {"connectionLimit": 60},
                "pgbouncer": {"poolSize": 10, "poolMode": "session"},
                "proxy": {"maxConnections": 50}},
    }},
})
POLICIES = {"proxytest": POLICY}


@dataclass
class Env:
    stack: Stack
    engine: Engine
    secrets: Any
    port: int
    proxy: Proxy
    tenants: dict[str, TenantDatabase]

    def dsn(self, tier: str, *, database: str | None = None, password: str | None = None) -> str:
        tenant = self.tenants[tier]
        pw = password if password is not None else self.secrets.passwords[tenant.key]
        return (f"postgresql://{tenant.database_name}:{pw}@127.0.0.1:{self.port}/"
                f"{database or tenant.database_name}?sslmode=disable")

    def proxy_limits_tier(self, tier: str) -> str:
        client = redis.Redis.from_url(self.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
        try:
            return decode_limits(str(client.hget(LIMITS_KEY, self.tenant_db(tier)))).tier
        finally:
            client.close()

    def state(self, tier: str) -> TenantState:
        """The proxy's state of this tenant (it has served it)."""
        return self.proxy.tenants.states[self.tenant_db(tier)]

    async def until(self, condition: Callable[[], bool], proxy: Proxy | None = None) -> None:
        """Until the proxy's state meets ``condition`` (checked whenever it changes); the timeout
        only keeps a broken proxy from hanging the run."""
        await asyncio.wait_for((proxy or self.proxy).tenants.changes.until(condition), 30)

    def tenant_db(self, tier: str) -> str:
        return self.tenants[tier].database_name

    def password(self, tier: str) -> str:
        return str(self.secrets.passwords[self.tenants[tier].key])

    async def set_tier(self, tier_key: str, new_tier: str) -> None:
        raw = self.tenants[tier_key].model_dump(by_alias=True, exclude_none=True, mode="json")
        raw["spec"]["tier"] = new_tier
        tenant = TenantDatabase.model_validate(raw)
        await self.engine.reconcile_all(POLICIES, [tenant])
        self.tenants[tier_key] = tenant


def make(db: str, tier: str) -> TenantDatabase:
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "proxy", "generation": 1},
        # One organization each: the tiers' own QPS budgets, not one shared by an organization.
        "spec": {"orgId": f"org-{db}", "tier": tier, "tierPolicyRef": "proxytest", "databaseName": db},
    })


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(stack: Stack) -> AsyncIterator[Env]:
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    suffix = uuid.uuid4().hex[:6]
    tenants = {tier: make(f"px_{tier.lower()}_{suffix}", tier) for tier in ("LIM", "THR", "BIG")}
    result = await engine.reconcile_all(POLICIES, list(tenants.values()))
    assert all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    try:
        async with running_proxy(stack.env["DYNABASE_REDIS_URL"], f"test-{suffix}") as (port, proxy):
            yield Env(stack, engine, secrets, port, proxy, tenants)
    finally:
        await close_engine(engine)


async def connect(env: Env, tier: str, **kwargs: Any) -> asyncpg.Connection:
    # statement_cache_size=0: PgBouncer in transaction mode and named statements do not mix.
    return await asyncpg.connect(env.dsn(tier), statement_cache_size=0, **kwargs)


pytestmark = pytest.mark.asyncio(loop_scope="session")


def coordinator(proxy: Proxy) -> Coordinator:
    assert isinstance(proxy.coordination, Coordinator)
    return proxy.coordination


async def test_psql_and_unknown_database(env: Env) -> None:
    # The proxy runs on this event loop: blocking clients go to a thread.
    out = await asyncio.to_thread(subprocess.run, ["psql", env.dsn("BIG"), "-tAc", "SELECT current_user"],
                                  capture_output=True, text=True, check=True)
    assert out.stdout.strip() == env.tenant_db("BIG")
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await asyncpg.connect(env.dsn("BIG", database="not_a_tenant"))
    assert "not a tenant database" in str(info.value)


async def test_connection_cap_counts_only_authenticated_clients(env: Env) -> None:
    for _ in range(5):  # failed logins do not use up slots
        with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError)):
            await asyncpg.connect(env.dsn("LIM", password="wrong"))
    conns = [await connect(env, "LIM") for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await connect(env, "LIM")
        assert info.value.sqlstate == "53300"
        assert "tier LIM allows 3" in str(info.value)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    await env.until(lambda: env.state("LIM").active == 0)  # the proxy saw them go
    conn = await connect(env, "LIM")  # a slot is free again
    await conn.close()


async def test_qps_rejection_leaves_the_session_usable(env: Env) -> None:
    await asyncio.sleep(1.2)  # let the bucket refill
    conn = await connect(env, "LIM")
    try:
        outcomes = []
        for _ in range(15):
            try:
                await conn.execute("SELECT 1")
                outcomes.append("ok")
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "53400", exc
                assert "tier LIM allows 5 queries per second" in str(exc)
                outcomes.append("rejected")
        assert outcomes.count("ok") >= 5 and outcomes.count("rejected") >= 5
        await asyncio.sleep(1.2)
        assert await conn.fetchval("SELECT 41 + 1") == 42  # extended protocol, after rejections
        # Inside a transaction, the synthetic ReadyForQuery keeps the transaction state.
        await asyncio.sleep(1.2)
        await conn.execute("BEGIN")
        rejected_in_tx = 0
        for _ in range(8):
            try:
                await conn.execute("SELECT 1")
            except asyncpg.PostgresError:
                rejected_in_tx += 1
        assert rejected_in_tx > 0
        assert conn.is_in_transaction()  # closing the connection rolls it back
    finally:
        await conn.close()


async def test_extended_protocol_rejection_skips_to_sync(env: Env) -> None:
    await asyncio.sleep(1.2)
    conn = await connect(env, "LIM")
    try:
        results = []
        for i in range(12):
            try:
                results.append(await conn.fetchval("SELECT $1::int * 2", i))
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "53400"
                results.append(None)
        assert None in results and any(r is not None for r in results)
        assert all(r == i * 2 for i, r in enumerate(results) if r is not None)
        await asyncio.sleep(1.2)
        assert await conn.fetchval("SELECT $1::text", "still fine") == "still fine"
    finally:
        await conn.close()


async def test_throttle_delays_instead_of_rejecting(env: Env) -> None:
    conn = await connect(env, "THR")
    try:
        usage = env.state("THR").usage
        throttled, rejected = usage.throttled, usage.rejected
        started = time.monotonic()
        for _ in range(30):
            await conn.execute("SELECT 1")  # none rejected: throttled ones wait
        # A lower bound, which no load can meet by luck: 10/s after a burst of 10 needs ~2 s.
        assert time.monotonic() - started >= 1.5
        assert usage.throttled > throttled and usage.rejected == rejected
    finally:
        await conn.close()


async def test_statement_timeout_cannot_be_switched_off(env: Env) -> None:
    await asyncio.sleep(1.2)
    conn = await connect(env, "LIM")
    try:
        cancelled = env.state("LIM").usage.statement_timeouts
        await conn.execute("SET statement_timeout = 0")
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await conn.execute("SELECT pg_sleep(3600)")
        # Postgres, told not to time out, did not: only the proxy cancels and words it so.
        assert info.value.sqlstate == "57014"
        assert "tier LIM allows 1000 ms per statement" in str(info.value)
        assert env.state("LIM").usage.statement_timeouts == cancelled + 1  # a limit hit, metered
    finally:
        await conn.close()


async def test_idle_in_transaction_session_is_ended(env: Env) -> None:
    await asyncio.sleep(1.2)
    state = env.proxy.tenants.get(env.tenant_db("LIM"))
    assert state is not None
    before = set(state.clients)
    # psycopg (libpq) reports the FATAL the proxy sent while the client was idle; asyncpg drops it.
    async with await psycopg.AsyncConnection.connect(env.dsn("LIM")) as conn:
        (mine,) = state.clients - before
        await conn.execute("SET idle_in_transaction_session_timeout = 0")
        await conn.execute("SELECT 1")  # psycopg opens a transaction, then the client idles in it
        await env.until(lambda: mine not in state.clients)  # ended by the proxy's sweep
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
            await conn.execute("SELECT 1")
    assert info.value.sqlstate == "25P03"
    assert "idle in transaction longer than the tier LIM limit of 1000 ms" in str(info.value)


async def test_client_cancel_request_is_routed(env: Env) -> None:
    conn = await connect(env, "BIG")
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(3600)", timeout=0.5)  # asyncpg sends a CancelRequest
        # Only a cancelled sleep lets the connection answer again (the wait only stops a hang).
        assert await asyncio.wait_for(conn.fetchval("SELECT 7"), 30) == 7
    finally:
        conn.terminate()


async def _raw_cancel(port: int, pid: int, key: int) -> bytes:
    """A CancelRequest as clients send it (length 16, code 80877102); returns the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("!iiii", 16, 80877102, pid, key))
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


async def _until_running(env: Env, query: str) -> None:
    admin = await asyncpg.connect(env.stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        for _ in range(200):
            if await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                                    query):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{query!r} never started")
    finally:
        await admin.close()


async def test_cancel_request_sent_to_another_replica_is_routed(env: Env) -> None:
    client = redis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    async with running_proxy(env.stack.env["DYNABASE_REDIS_URL"], f"b-{uuid.uuid4().hex[:6]}") as (port, replica_b):
        conn = await connect(env, "BIG")  # through replica A (env.port)
        try:
            pid, key = conn._protocol.backend_pid, conn._protocol.backend_secret
            assert (pid, key) in env.proxy.cancel_targets
            assert (pid, key) not in replica_b.cancel_targets  # B can only learn it from Redis
            # Known key or not, the sender is told nothing: the connection just closes.
            assert await _raw_cancel(port, pid, key ^ 0x5A5A) == b""
            sql = f"SELECT pg_sleep(10) -- {uuid.uuid4().hex[:6]}"
            query = asyncio.create_task(conn.execute(sql))
            await _until_running(env, sql)
            assert await _raw_cancel(port, pid, key) == b""
            with pytest.raises(asyncpg.QueryCanceledError) as info:
                await query  # without the cancel it would succeed after 10 s
            assert info.value.sqlstate == "57014"
            assert await conn.fetchval("SELECT 7") == 7
            assert client.get(cancel_key(pid, key)) is not None
        finally:
            await conn.close()
    await env.until(lambda: (pid, key) not in env.proxy.cancel_targets)  # A saw the connection go
    await coordinator(env.proxy).flush()  # which deletes its key
    assert client.get(cancel_key(pid, key)) is None
    client.close()


async def test_ssl_request_is_refused_cleanly(env: Env) -> None:
    dsn = env.dsn("BIG").replace("sslmode=disable", "sslmode=prefer")
    out = await asyncio.to_thread(subprocess.run, ["psql", dsn, "-tAc", "SELECT 1"], capture_output=True,
                                  text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


async def test_copy_in_and_out_and_psycopg_pipeline(env: Env) -> None:
    dsn = env.dsn("BIG")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS copy_t (id int, name text)")
        await conn.execute("TRUNCATE copy_t")
        async with conn.cursor() as cur:
            async with cur.copy("COPY copy_t FROM STDIN") as copy:
                for i in range(1000):
                    await copy.write_row((i, f"row {i}"))
            rows = []
            async with cur.copy("COPY copy_t TO STDOUT") as copy:
                async for row in copy.rows():
                    rows.append(row)
        assert len(rows) == 1000
        async with conn.pipeline():
            cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(50)]
        assert [(await c.fetchone())[0] for c in cursors] == list(range(50))


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
async def test_pgbench_modes_through_the_proxy(env: Env, mode: str) -> None:
    db = env.tenant_db("BIG")
    script = env.stack.devstack.root / "select1.sql"
    script.write_text("SELECT 1;\n")
    out = await asyncio.to_thread(
        subprocess.run,
        ["pgbench", "-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode, "-f", str(script),
         "-h", "127.0.0.1", "-p", str(env.port), "-U", db, db],
        env={**os.environ, "PGPASSWORD": env.password("BIG")}, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 800/800" in out.stdout


async def test_live_tier_change_reaches_the_proxy(env: Env) -> None:
    await asyncio.sleep(1.2)
    conns = [await connect(env, "LIM") for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await connect(env, "LIM")
        await env.set_tier("LIM", "THR")
        db = env.tenant_db("LIM")
        published = (await env.engine.proxy.observe())[db]  # type: ignore[union-attr]
        assert published.tier == "THR"
        await env.until(lambda: env.proxy.tenants.limits.get(db) == published)  # the proxy applied it
        conns.append(await connect(env, "LIM"))  # the new cap is live
    finally:
        await asyncio.gather(*(c.close() for c in conns))
        await env.set_tier("LIM", "LIM")  # a downgrade: it waits out the grace period...
        env.engine.clock.advance(hours=1)  # type: ignore[attr-defined]
        await env.set_tier("LIM", "LIM")  # ...which is over now
        assert env.proxy_limits_tier("LIM") == "LIM"


async def test_metering_counts_queries_exactly_and_flush_is_idempotent(env: Env) -> None:
    conn = await connect(env, "BIG")
    tenant_key = env.tenants["BIG"].key
    client = redis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)

    def counted() -> int:
        return sum(int(sample.counters["queries"]) for key in client.scan_iter(USAGE_PATTERN)
                   for sample in decode_usage(client.hgetall(key)) if sample.tenant == tenant_key)

    flush = coordinator(env.proxy).flush
    try:
        await flush()
        before = counted()
        for _ in range(37):
            await conn.execute("SELECT 1")
        await flush()
        assert counted() - before == 37
        await flush()  # further flushes rewrite the same absolute values
        assert counted() - before == 37
    finally:
        await conn.close()
        client.close()


# -- robustness -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4))
async def test_garbage_from_clients_never_crashes_or_leaks(env: Env, garbage: list[bytes]) -> None:
    proxy = env.proxy
    before = len(proxy.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    for chunk in garbage:
        writer.write(chunk)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.write_eof()
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(), 2)
    writer.close()
    try:
        await env.until(lambda: len(proxy.connections) <= before)
    except TimeoutError:
        raise AssertionError(f"connection left open after {garbage!r}") from None


async def test_oversized_startup_is_refused_with_an_error(env: Env) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write((20_000).to_bytes(4, "big") + (196608).to_bytes(4, "big"))
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"E") and b"08P01" in reply


async def test_tls_is_terminated_when_a_certificate_is_configured(env: Env, tmp_path_factory: Any) -> None:
    from dynabase.devstack import pki

    certs = pki.create(env.stack.devstack.root / f"proxy-tls-{uuid.uuid4().hex[:4]}")
    async with running_proxy(env.stack.env["DYNABASE_REDIS_URL"], f"tls-{uuid.uuid4().hex[:6]}",
                             tls_cert=str(certs.serving_cert), tls_key=str(certs.serving_key)) as (port, _):
        dsn = env.dsn("BIG").replace(f":{env.port}/", f":{port}/").replace("sslmode=disable", "sslmode=require")
        out = await asyncio.to_thread(subprocess.run, ["psql", dsn, "-c", "\\conninfo"], capture_output=True,
                                      text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert "SSL connection" in out.stdout


async def test_redis_lost_mid_run_keeps_enforcing_locally(env: Env) -> None:
    from dynabase.devstack.stack import Devstack

    root = env.stack.devstack.root / f"redis-{uuid.uuid4().hex[:4]}"
    side = Devstack(root)
    side.up(["redis"])
    main = redis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"])
    copy = redis.Redis.from_url(side.env()["DYNABASE_REDIS_URL"])
    for key in (LIMITS_KEY, AGENTS_KEY):
        copy.hset(key, mapping=main.hgetall(key))
    try:
        async with running_proxy(side.env()["DYNABASE_REDIS_URL"], f"side-{uuid.uuid4().hex[:6]}") as (port, replica):
            link = coordinator(replica)
            assert link.connected
            dsn = env.dsn("LIM").replace(f":{env.port}/", f":{port}/")
            conn = await asyncpg.connect(dsn, statement_cache_size=0)
            await asyncio.to_thread(side.down)  # Redis gone
            await env.until(lambda: not link.connected, replica)  # the replica noticed
            leases = link.lease_calls
            ok = rejected = 0
            for _ in range(20):
                try:
                    await conn.execute("SELECT 1")
                    ok += 1
                except asyncpg.PostgresError as exc:
                    assert exc.sqlstate == "53400"
                    rejected += 1
            assert link.lease_calls == leases  # no query waited for Redis: decided locally
            assert ok >= 1 and rejected >= 10  # still limited, from the local copy
            await conn.close()
            fresh = await asyncpg.connect(dsn, statement_cache_size=0)  # and new clients are still served
            await fresh.close()
    finally:
        main.close()
        copy.close()


async def test_busy_polling_spins_only_while_traffic_flows(env: Env) -> None:
    async with running_proxy(env.stack.env["DYNABASE_REDIS_URL"], f"bp-{uuid.uuid4().hex[:6]}",
                             busy_poll_us=10_000) as (port, replica):
        assert replica.poke is not None
        spinner = replica.poke.__self__  # type: ignore[attr-defined]
        assert not spinner.spinning
        dsn = env.dsn("BIG").replace(f":{env.port}/", f":{port}/")
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            asked = time.monotonic()
            assert await conn.fetchval("SELECT 6 * 7") == 42
            assert spinner.until > asked  # the query and its reply kept the loop polling...
            assert spinner.spinning or time.monotonic() >= spinner.until  # ...until a window after them
            await asyncio.wait_for(spinner.stopped.wait(), 30)  # and then stopped: quiet costs nothing
            assert not spinner.spinning and time.monotonic() >= spinner.until
        finally:
            await conn.close()
