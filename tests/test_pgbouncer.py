"""PgBouncer through the agent, as in production: the engine publishes, the
agent renders one PgBouncer per tier, clients see their tier's pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.desired.pgbouncer import PgBouncerDesired, PoolSettings, TenantRoute
from dynabase.engine.passes.pgbouncer import pgbouncer_outcome
from dynabase.engine.reconciler import Engine
from dynabase.keyspace import AGENTS_KEY

from .conftest import Stack
from .engine_helpers import FakeClock, example_policy, make_engine, make_tenant, unique
from .events import key_writes

POLICIES = {"default": example_policy()}


@pytest.fixture
async def engine(stack: Stack) -> AsyncIterator[tuple[Engine, Any, Stack]]:
    base, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    base.pgbouncer = pgbouncer
    try:
        yield base, secrets, stack
    finally:
        await base.postgres.close()
        await pgbouncer.close()


def admin(stack: Stack, port: int) -> psycopg.Connection[Any]:
    password = stack.env["DYNABASE_PGBOUNCER_ADMIN_DSN"].split(":")[2].split("@")[0]
    return psycopg.connect(host="127.0.0.1", port=port, dbname="pgbouncer", user="dynabase_admin",
                           password=password, autocommit=True, cursor_factory=psycopg.ClientCursor)


def show(stack: Stack, port: int, what: str) -> list[dict[str, Any]]:
    with admin(stack, port) as conn:
        cursor = conn.execute(f"SHOW {what}")
        names = [d.name for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


async def test_each_tier_pool_runs_with_its_settings_and_clients_see_them(engine) -> None:  # type: ignore[no-untyped-def]
    eng, secrets, stack = engine
    db = unique("pool")
    tenant = make_tenant(db, "FREE")
    result = await eng.reconcile_all(POLICIES, [tenant])
    outcome = {o.condition_type: o for o in result.tenants[0].outcomes}["PgBouncerReady"]
    assert outcome.ok, outcome
    pool, port = await eng.pgbouncer.route(db)
    assert pool == "default.FREE"
    config = {r["key"]: r["value"] for r in show(stack, port, "CONFIG")}
    assert config["default_pool_size"] == "3" and config["max_db_connections"] == "4"

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user=db, database=db,
                                 password=secrets.passwords[tenant.key], statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT current_user") == db
    finally:
        await conn.close()
    databases = {r["name"]: r for r in show(stack, port, "DATABASES")}
    assert databases[db]["pool_size"] == 3

    # PgBouncer 1.18 reports a failed SCRAM exchange as 08P01 rather than 28P01.
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError)) as info:
        await asyncpg.connect(host="127.0.0.1", port=port, user=db, database=db, password="wrong")
    assert "authentication failed" in str(info.value)


async def test_tier_change_moves_the_tenant_without_reloading_anything(engine) -> None:  # type: ignore[no-untyped-def]
    eng, secrets, stack = engine
    db = unique("move")
    await eng.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
    workdir = Path(stack.env["DYNABASE_PGBOUNCER_DIR"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in workdir.glob("*.ini")}
    result = await eng.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
    assert "route" in " ".join(result.tenants[0].plans["pgbouncer"])
    assert {p.name: p.stat().st_mtime_ns for p in workdir.glob("*.ini")} == mtimes  # no file rewritten
    pool, port = await eng.pgbouncer.route(db)
    assert pool == "default.PRO"
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user=db, database=db,
                                 password=secrets.passwords[f"test/{db.replace('_', '-')}"], statement_cache_size=0)
    await conn.close()
    assert {r["name"]: r for r in show(stack, port, "DATABASES")}[db]["pool_size"] == 20


async def test_pool_override_gets_its_own_entry_confirmed_live(engine) -> None:  # type: ignore[no-untyped-def]
    eng, _, stack = engine
    db = unique("custom")
    tenant = make_tenant(db, "PRO", overrides={"pgbouncer": {"poolSize": 7, "poolMode": "session"}})
    result = await eng.reconcile_all(POLICIES, [tenant])
    assert all(o.ok for o in result.tenants[0].outcomes), result.tenants[0].outcomes
    _, port = await eng.pgbouncer.route(db)
    row = {r["name"]: r for r in show(stack, port, "DATABASES")}[db]
    assert (row["pool_size"], row["pool_mode"]) == (7, "session")
    again = await eng.reconcile_all(POLICIES, [tenant])
    assert "pgbouncer" not in again.tenants[0].plans  # nothing to publish the second time


async def test_manual_change_to_pgbouncer_is_reverted_by_the_agent(engine) -> None:  # type: ignore[no-untyped-def]
    eng, _, stack = engine
    db = unique("revert")
    await eng.reconcile_all(POLICIES, [make_tenant(db, "STARTER")])
    _, port = await eng.pgbouncer.route(db)
    ini = Path(stack.env["DYNABASE_PGBOUNCER_DIR"]) / "default.STARTER.ini"
    ini.write_text(ini.read_text().replace("default_pool_size = 6", "default_pool_size = 99"))
    with admin(stack, port) as conn:
        conn.execute("RELOAD")
    assert {r["key"]: r["value"] for r in show(stack, port, "CONFIG")}["default_pool_size"] == "99"
    async with key_writes(stack.env["DYNABASE_REDIS_URL"], AGENTS_KEY) as reports:
        # The agent re-renders each interval (1s); the file differs, so it rewrites, reloads and
        # reports: each report is a pass, and one of those after the change puts 6 back.
        async def reverted() -> bool:
            return {r["key"]: r["value"] for r in show(stack, port, "CONFIG")}["default_pool_size"] == "6"

        await reports.until(reverted, "default_pool_size 6 again")


def test_no_agent_is_a_condition_not_silence() -> None:
    route = TenantRoute("d", "d", "default.FREE")
    desired = PgBouncerDesired({"default.FREE": PoolSettings(3, 1, 4, 0, "transaction")}, {"d": route})
    outcome = pgbouncer_outcome(route, desired, 1, [])
    assert not outcome.ok and outcome.reason == "NoAgent"
