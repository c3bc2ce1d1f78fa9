"""The tenant portal in Debian's headless Chromium, on headless mode's port: real traffic through the
proxy shows up on the tenant's page exactly as metered; a tenant sees only its own page; a wrong password
and forged or cross-site log-ins fail; a projected month is priced as the bill would price it."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.events_pg import PostgresEventLog, StoredEvent
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.portal_pg import PortalStore
from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.charges import month_hours
from dynabase.desired.cost import FittedModel, UsageTotals
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine
from dynabase.events.delivery import declared_endpoints
from dynabase.events.pipeline import event_pipeline
from dynabase.headless.http import serve
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource
from dynabase.keyspace import USAGE_PATTERN, decode_usage, encode_usage, usage_field, usage_key
from dynabase.portal.app import Portal, portal_app
from dynabase.portal.sources import HeadlessDeclarations
from dynabase.portal.usage import MonthDocs
from dynabase.proxy.coordinator import Coordinator
from dynabase.proxy.server import Proxy
from dynabase.spec import TenantDatabaseStatus
from dynabase.usage.month import RedisRollups

from .browser import Browser, chromium
from .conftest import Stack
from .engine_helpers import FakeClock, make_engine
from .proxy_helpers import running_proxy

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLICY = {
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "portal"},
    "spec": {"tiers": {
        "HOBBY": {"rank": 0, "description": "side projects",
                  "postgres": {"connectionLimit": 6, "statementTimeout": "10s"},
                  "pgbouncer": {"poolSize": 2, "poolMode": "transaction"},
                  "proxy": {"maxConnections": 2, "qps": 5, "burst": 5, "overLimit": "throttle",
                            "queueTimeout": "300ms"},
                  "lifecycle": {"idleTimeout": "1h", "coldWarning": "10m"},
                  "billing": {"includedVcpuHours": 1, "softOveragePeriod": "7d", "restrictedQps": 1}},
        "TEAM": {"rank": 10, "postgres": {"connectionLimit": 20, "statementTimeout": "30s"},
                 "pgbouncer": {"poolSize": 4}, "proxy": {"maxConnections": 20, "qps": 100, "burst": 200},
                 "billing": {"baseFeeUSD": 20, "includedVcpuHours": 50, "overagePerVcpuHourUSD": 0.10}},
        "SCALE": {"rank": 20, "postgres": {"connectionLimit": 60, "statementTimeout": "2m"},
                  "pgbouncer": {"poolSize": 10}, "proxy": {"maxConnections": 200, "qps": 1000, "burst": 2000},
                  "billing": {"baseFeeUSD": 80, "includedVcpuHours": 300, "overagePerVcpuHourUSD": 0.08}},
    }},
}
SHOTS = Path(os.environ.get("DYNABASE_PORTAL_SCREENSHOTS", "")) if os.environ.get("DYNABASE_PORTAL_SCREENSHOTS") \
    else None


def manifest(name: str, db: str, tier: str) -> str:
    return yaml.safe_dump({"apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                           "metadata": {"name": name, "namespace": "portal"},
                           "spec": {"orgId": f"org-{name}", "tier": tier, "tierPolicyRef": "portal",
                                    "databaseName": db}})


@dataclass
class Env:
    stack: Stack
    headless: HeadlessReconciler
    passwords: dict[str, str]
    base: str  # http://127.0.0.1:PORT/portal/
    proxy_port: int
    proxy: Proxy
    names: dict[str, str]  # role -> tenant name
    shots: Path

    def key(self, who: str) -> str:
        return f"portal/{self.names[who]}"

    def db(self, who: str) -> str:
        return self.headless.state.tenants[self.key(who)].database_name

    def password(self, who: str) -> str:
        return self.passwords[self.key(who)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    clock = FakeClock()
    clock.now = dt.datetime.now(dt.UTC)
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    folder = tmp_path_factory.mktemp("portal")
    suffix = uuid.uuid4().hex[:6]
    names = {"a": f"alpha-{suffix}", "b": f"bravo-{suffix}", "c": f"charlie-{suffix}"}
    (folder / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    for who, tier in (("a", "HOBBY"), ("b", "HOBBY"), ("c", "TEAM")):
        (folder / f"{who}.yaml").write_text(manifest(names[who], f"pt_{who}_{suffix}", tier))
    headless = HeadlessReconciler(engine, DirectorySource(folder), clock=clock)
    headless.events, headless.notifier = event_pipeline(engine.postgres.pool, declared_endpoints(headless.tenant))
    result = await headless.run_once()
    assert result is not None and all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    port = free_port()
    from dynabase.portal.sources import headless_portal

    runner = await serve(headless, "127.0.0.1", port, headless_portal(headless))
    try:
        async with running_proxy(stack.env["DYNABASE_REDIS_URL"], f"portal-{suffix}") as (proxy_port, proxy):
            yield Env(stack, headless, secrets.passwords, f"http://127.0.0.1:{port}/portal/", proxy_port, proxy,
                      names, SHOTS or tmp_path_factory.mktemp("shots"))
    finally:
        await runner.cleanup()
        await close_engine(engine)


async def metered(stack: Stack, tenant: str) -> dict[str, float]:
    """The tenant's counters as the proxies flushed them this month, summed over hours and replicas."""
    client = aioredis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    totals: dict[str, float] = {}
    hours = month_hours(dt.datetime.now(dt.UTC).strftime("%Y-%m"))
    try:
        async for key in client.scan_iter(USAGE_PATTERN):
            if int(key.rsplit(":", 1)[1]) not in hours:
                continue
            for sample in decode_usage(await client.hgetall(key)):
                if sample.tenant == tenant:
                    for name, value in sample.counters.items():
                        totals[name] = totals.get(name, 0) + value
    finally:
        await client.aclose()
    return totals


async def traffic(env: Env, who: str) -> None:
    """Two connections (the tier's cap) running queries faster than its 5 queries/s, and a third
    connection the cap refuses."""
    dsn = f"postgresql://{env.db(who)}:{env.password(who)}@127.0.0.1:{env.proxy_port}/{env.db(who)}?sslmode=disable"
    first = await asyncpg.connect(dsn, statement_cache_size=0)
    second = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(dsn, statement_cache_size=0)

        async def queries(conn: asyncpg.Connection) -> None:
            for _ in range(12):
                try:
                    await conn.fetchval("SELECT 1")
                except asyncpg.PostgresError as exc:  # over the queue timeout: refused, the session goes on
                    assert exc.sqlstate == "53400", exc

        await asyncio.gather(queries(first), queries(second))
    finally:
        await first.close()
        await second.close()
    coordination = env.proxy.coordination
    assert isinstance(coordination, Coordinator)
    await coordination.flush()


async def log_in(browser: Browser, env: Env, database: str, password: str) -> None:
    await browser.get(env.base)
    assert (await browser.url()).endswith("/portal/login")
    await browser.fill_and_submit({"database": database, "password": password})


async def test_the_page_shows_the_metered_usage_and_only_to_its_own_tenant(env: Env) -> None:
    await traffic(env, "a")
    await env.headless.run_once()  # judges the usage; events to the history
    counters = await metered(env.stack, env.key("a"))
    assert counters["rejected_connections"] == 1 and counters["throttled"] + counters["rejected"] > 0
    model = await PostgresCostModels(env.headless.engine.postgres.pool).in_force()
    vcpu = model.vcpu_hours(env.key("a"), UsageTotals(counters["queries"], counters["query_seconds"],
                                                      counters["connections"]))
    async with chromium() as browser, aiohttp.ClientSession() as http:
        await log_in(browser, env, env.db("a"), env.password("a"))
        assert (await browser.url()).endswith(f"/portal/t/{env.key('a')}"), await browser.text()
        for name in ("rejected_connections", "rejected", "throttled"):
            assert await browser.metric(name) == counters.get(name, 0), name
            assert await browser.metric(f"{name}-today") == counters.get(name, 0), name
        assert await browser.metric("queries") == pytest.approx(counters["queries"], abs=1e-6)
        assert await browser.metric("vcpu-hours") == pytest.approx(vcpu, abs=1e-6)
        text = await browser.text()
        assert "HOBBY (yours)" in text and "TEAM" in text and "TierApplied" in text
        timing = await browser.navigation()
        await browser.screenshot(env.shots / "portal-tenant-real-traffic.png")
        session = await browser.cookie("dynabase_session")
        assert session is not None and session["httpOnly"] and session["sameSite"] == "Lax"
        assert session["path"] == "/portal/"

        # Another tenant's page: refused, and nothing of it shown.
        await browser.get(f"{env.base}t/{env.key('b')}")
        text = await browser.text()
        assert "Not your page" in text and env.db("b") not in text
        async with http.get(f"{env.base}t/{env.key('b')}", cookies={"dynabase_session": session["value"]},
                            allow_redirects=False) as response:
            assert response.status == 403
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        await browser.screenshot(env.shots / "portal-forbidden.png")

        # Logged out: the old cookie opens nothing any more.
        await browser.get(f"{env.base}t/{env.key('a')}")
        await browser.fill_and_submit({})  # the header's Log out button
        assert (await browser.url()).endswith("/portal/login")
        async with http.get(f"{env.base}t/{env.key('a')}", cookies={"dynabase_session": session["value"]},
                            allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/portal/login"

        # A wrong password: the form again, with the error, and no session.
        await log_in(browser, env, env.db("a"), env.password("a") + "x")
        assert (await browser.url()).endswith("/portal/login")
        assert "Wrong database name or password." in await browser.text()
        assert await browser.cookie("dynabase_session") is None
        await browser.screenshot(env.shots / "portal-login-refused.png")
    print(f"\nreal-traffic page: {timing['bytes']:.0f} bytes of HTML ({timing['transfer']:.0f} transferred), "
          f"{timing['resources']:.0f} other requests; first byte {timing['ttfb']:.0f} ms, "
          f"DOMContentLoaded {timing['domContentLoaded']:.0f} ms, load {timing['load']:.0f} ms")


async def form_csrf(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}login") as response:
        found = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert found is not None
    return found.group(1)


async def test_forged_and_cross_site_log_ins_and_guessing_are_refused(env: Env) -> None:
    url = f"{env.base}login"
    database, password = env.db("b"), env.password("b")
    def client() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies of 127.0.0.1 too

    async with client() as http, http.post(  # no login cookie: a form posted from elsewhere
            url, data={"database": database, "password": password, "csrf": "made-up"},
            allow_redirects=False) as response:
        assert response.status == 403 and "dynabase_session" not in response.cookies
    async with client() as http:
        csrf = await form_csrf(http, env.base)
        async with http.post(url, data={"database": database, "password": password, "csrf": csrf},
                             headers={"Origin": "https://evil.example"}, allow_redirects=False) as response:
            assert response.status == 403 and "dynabase_session" not in response.cookies
    async with client() as http:
        for attempt in range(11):
            csrf = await form_csrf(http, env.base)
            async with http.post(url, data={"database": database, "password": f"guess-{attempt}", "csrf": csrf},
                                 allow_redirects=False) as response:
                assert response.status == (401 if attempt < 10 else 429), attempt
        assert int(response.headers["Retry-After"]) > 0
        csrf = await form_csrf(http, env.base)  # the right password too, until the window has passed
        async with http.post(url, data={"database": database, "password": password, "csrf": csrf},
                             allow_redirects=False) as response:
            assert response.status == 429


async def test_a_new_database_password_ends_the_portal_session(env: Env) -> None:
    store = PortalStore(env.headless.engine.postgres.pool)
    declared = await HeadlessDeclarations(env.headless).declared()
    from dynabase.portal.auth import log_in as check

    logged_in = await check(store, declared[1], env.db("c"), env.password("c"), dt.timedelta(hours=1),
                            dt.datetime.now(dt.UTC))
    assert logged_in is not None and logged_in.tenant.key == env.key("c")
    assert await check(store, declared[1], env.db("c"), "nope", dt.timedelta(hours=1),
                       dt.datetime.now(dt.UTC)) is None
    assert (await store.session(logged_in.token)) is not None
    conn = await asyncpg.connect(env.stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        verifier = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", env.db("c"))
        await conn.execute(f'ALTER ROLE "{env.db("c")}" PASSWORD \'another password\'')
        assert (await store.session(logged_in.token)) is None
        await conn.execute(f'ALTER ROLE "{env.db("c")}" PASSWORD \'{verifier}\'')  # as it was
    finally:
        await conn.close()


class Overlay:
    """The headless declarations with one tenant's status replaced (a tenant created on the 1st)."""

    def __init__(self, inner: HeadlessDeclarations, key: str, status: TenantDatabaseStatus) -> None:
        self.inner, self.key, self.status = inner, key, status

    async def declared(self) -> Any:
        return await self.inner.declared()

    async def statuses(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        found = await self.inner.statuses(keys)
        return {**found, self.key: self.status} if self.key in keys else found


async def test_a_month_in_progress_is_projected_and_priced_as_the_bill_would_be(env: Env) -> None:
    """Tenant c on TEAM since 1 November, 0.0817 vCPU-hours every hour, viewed on the 20th at 14:00."""
    now = dt.datetime(2026, 11, 20, 14, 0, tzinfo=dt.UTC)
    key, pool = env.key("c"), env.headless.engine.postgres.pool
    redis = aioredis.Redis.from_url(env.stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    hours = range(month_hours("2026-11").start, int(now.timestamp()) // 3600 + 1)
    per_hour = {"queries": 5_000, "query_seconds": 700.0, "connections": 3, "throttled": 2, "rejected": 0,
                "rejected_connections": 0}
    for hour in hours:
        counters = {**per_hour, "rejected": 1 if hour % 7 == 0 else 0}
        await redis.hset(usage_key(hour), usage_field(key, "r1"), encode_usage(counters, "TEAM"))
    created = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    status = TenantDatabaseStatus.model_validate({"phase": "Active", "appliedTier": "TEAM",
                                                  "history": [{"from": None, "to": "TEAM", "at": created}]})
    log = PostgresEventLog(pool)
    await log.append([StoredEvent(f"evt_shot_{key}_{i}", key, "org", env.db("c"), "TEAM", kind, reason, message, at)
                      for i, (kind, reason, message, at) in enumerate((
                          ("Normal", "TierApplied", "tier TEAM applied (was none)", created),
                          ("Warning", "UsageWarning", "80% of the month's included usage: 40.03 of 50 included "
                           "vCPU-hours", dt.datetime(2026, 11, 17, 9, 0, tzinfo=dt.UTC))))])
    usage = ProxyBackend(env.stack.env["DYNABASE_REDIS_URL"])
    portal = Portal(Overlay(HeadlessDeclarations(env.headless), key, status), PortalStore(pool), log,
                    MonthDocs(RedisRollups(usage)), PostgresCostModels(pool), clock=lambda: now)
    app = portal_app(portal)
    from aiohttp import web

    root = web.Application()
    root.add_subapp("/portal/", app)
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/portal/"
    try:
        model: FittedModel = await PostgresCostModels(pool).in_force()
        used = model.vcpu_hours(key, UsageTotals(5_000.0 * len(hours), 700.0 * len(hours), 3.0 * len(hours)))
        elapsed = (now - created).total_seconds() / 3600
        projected = used * (30 * 24) / elapsed
        price = 20 + max(0.0, projected - 50) * 0.10
        async with chromium() as browser:
            await browser.get(base)
            await browser.fill_and_submit({"database": env.db("c"), "password": env.password("c")})
            assert await browser.metric("vcpu-hours") == pytest.approx(used, abs=1e-6)
            assert await browser.metric("projected-vcpu-hours") == pytest.approx(projected, abs=1e-6)
            assert round(await browser.metric("projected-price"), 2) == round(price, 2)
            assert await browser.metric("throttled") == 2 * len(hours)
            assert await browser.metric("rejected") == sum(1 for h in hours if h % 7 == 0)
            on_scale = 80 + max(0.0, projected - 300) * 0.08
            assert round(await browser.metric("next-tier-price"), 2) == round(on_scale, 2)
            started = time.perf_counter()
            await browser.get(f"{base}t/{key}")
            wall = time.perf_counter() - started
            timing = await browser.navigation()
            await browser.screenshot(env.shots / "portal-tenant-mid-month.png")
        print(f"\nmid-month page: {timing['bytes']:.0f} bytes, {timing['resources']:.0f} other requests; "
              f"first byte {timing['ttfb']:.0f} ms, load {timing['load']:.0f} ms ({wall * 1000:.0f} ms as Selenium "
              f"waited); used {used:.2f}, projected {projected:.2f} vCPU-h, ${price:.2f}")
    finally:
        await runner.cleanup()
        await usage.close()
        for hour in hours:
            await redis.hdel(usage_key(hour), usage_field(key, "r1"))
        await redis.aclose()


async def test_dynabase_portal_serves_the_same_pages_on_its_own(env: Env, tmp_path: Path) -> None:
    """The standalone command, as a platform runs it beside headless mode: tenants from the manifests."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dynabase.cli", "portal", "--manifests", str(env.headless.source.checkout()),
        "--listen", f"127.0.0.1:{port}", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DYNABASE_POSTGRES_DSN": env.stack.env["DYNABASE_POSTGRES_DSN"],
             "DYNABASE_REDIS_URL": env.stack.env["DYNABASE_REDIS_URL"]})
    base = f"http://127.0.0.1:{port}/portal/"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await listening(http, f"http://127.0.0.1:{port}/healthz", process)
            csrf = await form_csrf(http, base)
            async with http.post(f"{base}login", data={"database": env.db("a"), "password": env.password("a"),
                                                       "csrf": csrf}) as response:
                assert response.status == 200 and str(response.url).endswith(f"/portal/t/{env.key('a')}")
                page = await response.text()
        assert 'data-metric="queries"' in page and "HOBBY (yours)" in page
    finally:
        process.terminate()
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def listening(http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process) -> None:
    """Until the process answers on its port (or has died)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.returncode is None:
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")
