"""The engine against the devstack's real Postgres: limits are live, drift is
reverted, a pass without drift writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dynabase.desired.sql import quote_ident
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore

from .conftest import Stack
from .engine_helpers import FakeClock, example_policy, make_engine, make_tenant, unique

POLICIES = {"default": example_policy()}


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[tuple[Engine, MemorySecretStore, MemoryStatusStore, FakeClock, Stack]]:
    clock = FakeClock()
    engine, secrets, statuses = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    try:
        yield engine, secrets, statuses, clock, stack
    finally:
        await engine.postgres.close()


def tenant_dsn(stack: Stack, user: str, password: str, database: str) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{stack.env['PGPORT']}/{database}"


async def admin(stack: Stack) -> asyncpg.Connection:
    return await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"])


async def test_free_tenant_gets_five_connections_and_the_sixth_is_refused(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, _, _, stack = env
    db = unique("free")
    tenant = make_tenant(db, "FREE")
    result = await engine.reconcile_all(POLICIES, [tenant])
    assert result.tenants[0].ready, result.tenants[0].outcomes
    dsn = tenant_dsn(stack, db, secrets.passwords[tenant.key], db)
    conns = [await asyncpg.connect(dsn) for _ in range(5)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(dsn)
        assert info.value.sqlstate == "53300"
        assert "too many connections for role" in str(info.value)
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_statement_timeout_is_live_in_a_new_session(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, _, _, stack = env
    db = unique("timeout")
    tenant = make_tenant(db, "FREE", overrides={"postgres": {"statementTimeout": "300ms"}})
    await engine.reconcile_all(POLICIES, [tenant])
    conn = await asyncpg.connect(tenant_dsn(stack, db, secrets.passwords[tenant.key], db))
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "300ms"
        assert await conn.fetchval("SHOW work_mem") == "4MB"
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(2)")
    finally:
        await conn.close()


async def test_one_tenant_cannot_open_another_tenants_database(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, _, _, stack = env
    a, b = unique("ta"), unique("tb")
    ta, tb = make_tenant(a, "PRO"), make_tenant(b, "PRO")
    await engine.reconcile_all(POLICIES, [ta, tb])
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
        await asyncpg.connect(tenant_dsn(stack, a, secrets.passwords[ta.key], b))
    assert "permission denied for database" in str(info.value)
    own = await asyncpg.connect(tenant_dsn(stack, a, secrets.passwords[ta.key], a))
    await own.close()


async def test_upgrade_is_immediate_and_downgrade_waits_for_the_grace_period(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, statuses, clock, stack = env
    db = unique("tiers")
    await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
    conn = await admin(stack)
    try:
        limit = "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1"
        assert await conn.fetchval(limit, db) == 5

        await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
        assert await conn.fetchval(limit, db) == 50

        result = await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
        status = statuses.statuses[f"test/{db.replace('_', '-')}"]
        assert status.applied_tier == "PRO" and status.pending_tier == "FREE"
        assert status.effective_at == clock.now.replace() + __import__("datetime").timedelta(minutes=15)
        assert ("Normal", "DowngradeScheduled") in [(t, r) for t, r, _ in result.tenants[0].events]
        assert await conn.fetchval(limit, db) == 50

        clock.advance(minutes=14)
        await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
        assert await conn.fetchval(limit, db) == 50

        clock.advance(minutes=2)
        await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
        assert await conn.fetchval(limit, db) == 5
        status = statuses.statuses[f"test/{db.replace('_', '-')}"]
        assert status.applied_tier == "FREE" and status.pending_tier is None
        assert [h.to_tier for h in status.history] == ["FREE", "PRO", "FREE"]
    finally:
        await conn.close()


async def test_upgrade_during_grace_period_cancels_the_downgrade(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, statuses, clock, _ = env
    db = unique("cancel")
    await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
    await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
    key = f"test/{db.replace('_', '-')}"
    assert statuses.statuses[key].pending_tier == "FREE"
    clock.advance(minutes=5)
    await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
    assert statuses.statuses[key].pending_tier is None
    clock.advance(hours=1)
    await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
    assert statuses.statuses[key].applied_tier == "PRO"


async def _catalog_xmins(conn: asyncpg.Connection, name: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT a.xmin::text FROM pg_authid a WHERE rolname = $1
           UNION ALL SELECT s.xmin::text FROM pg_db_role_setting s JOIN pg_authid a ON a.oid = s.setrole
                     WHERE a.rolname = $1
           UNION ALL SELECT d.xmin::text FROM pg_database d WHERE datname = $1""",
        name,
    )
    return [r[0] for r in rows]


async def test_drift_is_reverted_and_a_pass_without_drift_writes_nothing(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, statuses, _, stack = env
    db = unique("drift")
    tenant = make_tenant(db, "FREE")
    await engine.reconcile_all(POLICIES, [tenant])
    conn = await admin(stack)
    try:
        await conn.execute(f"ALTER ROLE {quote_ident(db)} CONNECTION LIMIT 999")
        await conn.execute(f"ALTER ROLE {quote_ident(db)} SET statement_timeout = 0")
        await conn.execute(f"ALTER ROLE {quote_ident(db)} SET search_path = public")  # not ours: left alone
        await conn.execute(f"ALTER ROLE {quote_ident(db)} CREATEDB")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO PUBLIC')
        result = await engine.reconcile_all(POLICIES, [tenant])
        assert result.writes > 0
        row = await conn.fetchrow(
            "SELECT rolconnlimit, rolcreatedb, setconfig FROM pg_roles r "
            "JOIN pg_db_role_setting s ON s.setrole = r.oid WHERE rolname = $1", db
        )
        assert row["rolconnlimit"] == 5 and row["rolcreatedb"] is False
        assert "statement_timeout=10s" in row["setconfig"] and "search_path=public" in row["setconfig"]

        before = await _catalog_xmins(conn, db)
        status_writes = statuses.writes
        quiet = await engine.reconcile_all(POLICIES, [tenant])
        assert quiet.writes == 0, quiet.render()
        assert not quiet.changes
        assert statuses.writes == status_writes
        assert await _catalog_xmins(conn, db) == before  # the server agrees: no row was rewritten
    finally:
        await conn.close()


async def test_unknown_tier_fails_that_tenant_only(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, statuses, _, _ = env
    good, bad = make_tenant(unique("good"), "STARTER"), make_tenant(unique("bad"), "GOLD")
    missing_policy = make_tenant(unique("nopol"), "FREE", tierPolicyRef="gone")
    result = await engine.reconcile_all(POLICIES, [good, bad, missing_policy])
    by_key = {r.key: r for r in result.tenants}
    assert by_key[good.key].ready
    assert by_key[bad.key].error is not None and by_key[bad.key].error.reason == "TierNotFound"
    assert "GOLD" in by_key[bad.key].error.message and "FREE" in by_key[bad.key].error.message
    assert by_key[missing_policy.key].error.reason == "TierPolicyNotFound"
    ready = statuses.statuses[bad.key].condition("Ready")
    assert ready is not None and ready.status == "False" and ready.reason == "TierNotFound"
    assert statuses.statuses[bad.key].phase == "Degraded"


async def test_role_owned_by_someone_else_is_not_taken_over(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, statuses, _, stack = env
    db = unique("squat")
    conn = await admin(stack)
    try:
        await conn.execute(f"CREATE ROLE {quote_ident(db)} LOGIN CONNECTION LIMIT 77")
        tenant = make_tenant(db, "FREE")
        result = await engine.reconcile_all(POLICIES, [tenant])
        assert not result.tenants[0].ready
        assert statuses.statuses[tenant.key].condition("PostgresReady").reason == "RoleConflict"  # type: ignore[union-attr]
        assert await conn.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", db) == 77
    finally:
        await conn.close()


async def test_suspend_ends_sessions_and_refuses_login(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, statuses, _, stack = env
    db = unique("susp")
    tenant = make_tenant(db, "PRO")
    await engine.reconcile_all(POLICIES, [tenant])
    dsn = tenant_dsn(stack, db, secrets.passwords[tenant.key], db)
    session = await asyncpg.connect(dsn)
    await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO", suspended=True)])
    conn = await admin(stack)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", db) == 0
    finally:
        await conn.close()
    session.terminate()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(dsn)
    assert statuses.statuses[tenant.key].phase == "Suspended"
    await engine.reconcile_all(POLICIES, [tenant])
    await (await asyncpg.connect(dsn)).close()


async def test_deletion_retain_keeps_data_and_delete_drops_it(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, _, _, stack = env
    keep, drop = unique("keep"), unique("drop")
    t_keep, t_drop = make_tenant(keep, "FREE"), make_tenant(drop, "FREE", deletionPolicy="Delete")
    await engine.reconcile_all(POLICIES, [t_keep, t_drop])
    await engine.reconcile_all(POLICIES, [], deleted=[t_keep, t_drop])
    conn = await admin(stack)
    try:
        assert await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", keep) is False
        assert await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", keep) == 1
        assert await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", drop) is None
        assert await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", drop) is None
    finally:
        await conn.close()


async def test_plan_output_never_contains_secrets(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, _, _, _ = env
    db = unique("secret")
    tenant = make_tenant(db, "FREE")
    secrets.passwords[tenant.key] = "hunter2-very-secret"
    plan = await engine.reconcile_all(POLICIES, [tenant], dry_run=True)
    applied = await engine.reconcile_all(POLICIES, [tenant])
    secrets.passwords[tenant.key] = "rotated-secret-value"
    rotated = await engine.reconcile_all(POLICIES, [tenant])
    for text in (plan.render(), applied.render(), rotated.render()):
        assert "hunter2" not in text and "rotated-secret" not in text and "SCRAM-SHA-256$" not in text
    assert "PASSWORD '***'" in rotated.render()
