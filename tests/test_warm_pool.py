"""The warm pool against the devstack's Postgres: databases made ahead, claimed by renaming
inside the tenant's plan, indistinguishable from created ones, closed until claimed, never
handed to two tenants, refilled and shrunk in the background."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import yaml

from dynabase.backends import warm_pool as pool_backend
from dynabase.backends.postgres import PostgresBackend
from dynabase.desired.postgres import plan_postgres, render_plan
from dynabase.desired.postgres_observed import PostgresObserved
from dynabase.desired.warm_pool import POOL_OWNER, fill_plan, pool_database_name, pool_prefix
from dynabase.engine.reconciler import Engine
from dynabase.engine.runtime import close_engine
from dynabase.spec import TierPolicy

from .conftest import ROOT, Stack
from .engine_helpers import make_engine, make_tenant, unique


def policy(name: str, size: int | None) -> TierPolicy:
    raw = yaml.safe_load((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    raw["metadata"]["name"] = name
    if size is not None:
        raw["spec"]["warmPool"] = {"size": size}
    return TierPolicy.model_validate(raw)


def pooled_tenant(db: str, policy_name: str) -> Any:
    return make_tenant(db, "FREE", tierPolicyRef=policy_name)


@pytest.fixture
async def engine(stack: Stack) -> AsyncIterator[Engine]:
    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        yield engine
    finally:
        await close_engine(engine)


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        yield conn
    finally:
        await conn.close()


async def pool_of(admin: asyncpg.Connection, policy_name: str) -> dict[str, int]:
    """Unclaimed pool databases of a policy: name -> oid."""
    return {name: oid for oid, name in await pool_backend.pool_databases(admin, pool_prefix(policy_name))}


async def fill(engine: Engine, policies: dict[str, TierPolicy]) -> None:
    await engine.bootstrap()
    engine.warm_pool.want({name: p.spec.warm_pool.size if p.spec.warm_pool else 0 for name, p in policies.items()})
    await asyncio.wait_for(engine.warm_pool.until_full(), 120)


async def database_facts(admin: asyncpg.Connection, db: str, stack: Stack, *, contents: bool = True) -> dict[str, Any]:
    """What a tenant, PgBouncer or a person could tell about a database, with its own name and owner
    written as placeholders so two tenants' databases compare equal when they are alike."""
    row = await admin.fetchrow(
        "SELECT d.oid, r.rolname AS owner, d.encoding, d.datcollate, d.datctype, d.datistemplate, d.datallowconn, "
        "d.datconnlimit, t.spcname, d.datacl::text[] AS acl, "
        "(SELECT count(*) FROM pg_db_role_setting s WHERE s.setdatabase = d.oid) AS settings, "
        "(SELECT count(*) FROM pg_shdescription c WHERE c.objoid = d.oid) AS comments "
        "FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba JOIN pg_tablespace t ON t.oid = d.dattablespace "
        "WHERE d.datname = $1", db)
    assert row is not None, f"database {db} missing"
    facts = {k: v for k, v in dict(row).items() if k not in ("oid", "owner", "acl")}
    facts["owner_is_tenant"] = row["owner"] == db
    facts["acl"] = [item.replace(db, "<tenant>") for item in row["acl"]]
    if not contents:
        return facts
    inside = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"], database=db)
    try:
        facts["schemas"] = [
            (r["nspname"], r["owner"], r["acl"]) for r in await inside.fetch(
                "SELECT nspname, pg_get_userbyid(nspowner) AS owner, nspacl::text[] AS acl FROM pg_namespace "
                "ORDER BY nspname")]
        facts["objects"] = await inside.fetchval(
            "SELECT md5(string_agg(format('%s.%s:%s', n.nspname, c.relname, c.relkind), ',' ORDER BY 1)) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace")
        facts["functions"] = [
            (r["proname"], r["owner"], r["acl"]) for r in await inside.fetch(
                "SELECT p.proname, pg_get_userbyid(p.proowner) AS owner, p.proacl::text[] AS acl FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', "
                "'information_schema') ORDER BY 1")]
    finally:
        await inside.close()
    return facts


def test_fill_plan_tops_up_and_trims_known_policies_only() -> None:
    a, b = pool_database_name("a", "1"), pool_database_name("a", "2")
    other = pool_database_name("gone", "9")
    plan = fill_plan({"a": 1, "b": 2}, [b, a, other])
    assert plan.create == {"b": 2}
    assert plan.drop == (b,)  # the oldest-named one stays; the policy nobody named is left alone
    assert fill_plan({"a": 3}, [a]).create == {"a": 2}


async def test_claimed_database_is_indistinguishable_from_a_created_one(
        stack: Stack, engine: Engine, admin: asyncpg.Connection) -> None:
    pooled, plain = f"pool-{uuid.uuid4().hex[:6]}", f"plain-{uuid.uuid4().hex[:6]}"
    policies = {pooled: policy(pooled, 1), plain: policy(plain, None)}
    await fill(engine, policies)
    before = await pool_of(admin, pooled)
    assert len(before) == 1
    pool_oid = next(iter(before.values()))
    facts = await database_facts(admin, next(iter(before)), stack, contents=False)
    assert not facts["datallowconn"] and facts["acl"] == [f"{POOL_OWNER}=CTc/{POOL_OWNER}"]

    claimed_db, created_db = unique("claimed"), unique("created")
    result = await engine.reconcile_all(
        policies, [pooled_tenant(claimed_db, pooled), pooled_tenant(created_db, plain)])
    assert all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    assert await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", claimed_db) == pool_oid
    assert await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", created_db) not in before.values()

    claimed, created = (await database_facts(admin, claimed_db, stack), await database_facts(admin, created_db, stack))
    assert claimed["owner_is_tenant"] and claimed["acl"] == ["<tenant>=CTc/<tenant>", "dynabase_pgbouncer=c/<tenant>"]
    assert claimed == created
    # A pass without drift writes nothing for it either.
    again = await engine.reconcile_all(policies, [pooled_tenant(claimed_db, pooled)])
    assert again.writes == 0


async def test_the_tenant_uses_its_claimed_database_and_no_one_else_can(
        stack: Stack, engine: Engine, admin: asyncpg.Connection) -> None:
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    policies = {pooled: policy(pooled, 2)}
    await fill(engine, policies)
    a, b = unique("owner"), unique("other")
    ta, tb = pooled_tenant(a, pooled), pooled_tenant(b, pooled)
    await engine.warm_pool.close()
    engine.warm_pool.refill = False  # the next pool database stays the one left
    result = await engine.reconcile_all(policies, [ta])
    assert result.tenants[0].ready
    left = await pool_of(admin, pooled)
    assert len(left) == 1
    password = engine.secrets.passwords[ta.key]  # type: ignore[attr-defined]
    port = stack.env["PGPORT"]
    own = await asyncpg.connect(f"postgresql://{a}:{password}@127.0.0.1:{port}/{a}")
    try:
        await own.execute("CREATE TABLE notes (id int)")  # the owner may create in public, as on a created one
    finally:
        await own.close()
    with pytest.raises(asyncpg.PostgresError) as refused:
        await asyncpg.connect(f"postgresql://{a}:{password}@127.0.0.1:{port}/{next(iter(left))}")
    assert refused.value.sqlstate in ("55000", "42501")  # not accepting connections / no CONNECT
    await engine.reconcile_all(policies, [tb])  # the last one is claimed by the next sign-up
    assert await pool_of(admin, pooled) == {}


async def test_concurrent_claims_never_hand_one_pool_database_to_two_tenants(
        stack: Stack, engine: Engine, admin: asyncpg.Connection) -> None:
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    policies = {pooled: policy(pooled, 3)}
    await fill(engine, policies)
    await engine.warm_pool.close()  # no refill while they race
    engine.warm_pool.refill = False
    pool = await pool_of(admin, pooled)
    conns = [await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) for _ in range(8)]
    transactions = [conn.transaction() for conn in conns]
    try:
        for tx in transactions:
            await tx.start()
        wanted = [unique("race") for _ in conns]
        prefix = pool_prefix(pooled)
        got = await asyncio.gather(*(pool_backend.claim(c, prefix, w) for c, w in zip(conns, wanted, strict=True)))
        for tx in transactions:
            await tx.commit()
    finally:
        for conn in conns:
            await conn.close()
    names = [g for g in got if g is not None]
    assert sorted(names) == sorted(pool)  # each one claimed exactly once, and all of them
    renamed = {w for w, g in zip(wanted, got, strict=True) if g is not None}
    oids = {await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", w) for w in renamed}
    assert oids == set(pool.values())
    for w in renamed:
        await admin.execute(f'DROP DATABASE "{w}"')


async def test_two_engines_at_once_claim_each_pool_database_once_and_create_the_rest(
        stack: Stack, engine: Engine, admin: asyncpg.Connection) -> None:
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    policies = {pooled: policy(pooled, 2)}
    await fill(engine, policies)
    pool = await pool_of(admin, pooled)
    second, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    await engine.warm_pool.close()
    engine.warm_pool.refill = second.warm_pool.refill = False
    try:
        names = [unique("both") for _ in range(6)]
        tenants = [pooled_tenant(n, pooled) for n in names]
        # Both engines observe the same two pool databases and plan claims for them.
        results = await asyncio.gather(engine.reconcile_all(policies, tenants[:3]),
                                       second.reconcile_all(policies, tenants[3:]))
    finally:
        await close_engine(second)
    assert all(t.ready for r in results for t in r.tenants), [t.outcomes for r in results for t in r.tenants]
    oids = [await admin.fetchval("SELECT oid FROM pg_database WHERE datname = $1", n) for n in names]
    assert None not in oids and len(set(oids)) == 6
    assert set(pool.values()) <= set(oids)  # both pool databases went to tenants, each to one
    assert await pool_of(admin, pooled) == {}


async def test_an_empty_pool_at_apply_time_falls_back_to_create_database(stack: Stack, engine: Engine) -> None:
    """Planned with a pool database in sight, applied after another engine took it."""
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    await engine.bootstrap()
    tenant = pooled_tenant(unique("late"), pooled)
    result = await engine.reconcile_all({pooled: policy(pooled, None)}, [tenant], dry_run=True)
    assert not any("warm pool" in line for line in result.tenants[0].plans["postgres"])
    backend: PostgresBackend = engine.postgres
    target = _target(tenant, pooled)
    plan = plan_postgres(target, PostgresObserved(warm_pool={pool_prefix(pooled): 1}), claim=True)
    assert any("warm pool" in line for line in render_plan(plan))
    applied = await backend.apply(plan)
    assert applied.pool_empty and applied.claimed is None
    again = await backend.observe([target.role], [target.database])
    assert plan_postgres(target, again).empty  # created with the same owner and grants as the plan's claim


def _target(tenant: Any, policy_name: str) -> Any:
    from dynabase.desired.effective import effective_limits
    from dynabase.desired.postgres import Password, tenant_target

    limits = effective_limits(tenant, policy(policy_name, None), "FREE")
    return tenant_target(tenant, limits, password=Password("pw-" + uuid.uuid4().hex), restriction=None, cold=False,
                         warm_pool=pool_prefix(policy_name))


async def test_the_pool_refills_in_the_background_and_shrinks(engine: Engine, admin: asyncpg.Connection) -> None:
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    policies = {pooled: policy(pooled, 3)}
    await fill(engine, policies)
    first = await pool_of(admin, pooled)
    result = await engine.reconcile_all(policies, [pooled_tenant(unique("signup"), pooled) for _ in range(2)])
    assert all(t.ready for t in result.tenants)
    await asyncio.wait_for(engine.warm_pool.until_full(), 120)
    refilled = await pool_of(admin, pooled)
    assert len(refilled) == 3 and len(set(refilled) & set(first)) == 1  # two claimed, two new
    await fill(engine, {pooled: policy(pooled, 0)})
    assert await pool_of(admin, pooled) == {}


async def test_a_template_change_drops_pool_databases_made_from_the_old_template(
        stack: Stack, engine: Engine, admin: asyncpg.Connection) -> None:
    pooled = f"pool-{uuid.uuid4().hex[:6]}"
    await fill(engine, {pooled: policy(pooled, 1)})
    await engine.warm_pool.close()
    assert len(await pool_of(admin, pooled)) == 1
    template = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"], database="template1")
    try:
        await template.execute("DROP FUNCTION dynabase_pgbouncer.lookup(text)")
    finally:
        await template.close()
    fresh = PostgresBackend(stack.env["DYNABASE_POSTGRES_DSN"])
    await fresh.start()
    try:
        await fresh.bootstrap()  # writes template1 again, so the old copies must go
    finally:
        await fresh.close()
    assert await pool_of(admin, pooled) == {}


async def test_a_first_connection_ahead_of_the_limits_message_is_served(stack: Stack) -> None:
    """A sign-up connects right after its pass; the proxy may not have the change message yet."""
    from dynabase.backends.pgbouncer import PgBouncerBackend
    from dynabase.backends.proxy import ProxyBackend

    from .proxy_helpers import running_proxy

    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    policies = {"default": policy("default", None)}
    try:
        async with running_proxy(stack.env["DYNABASE_REDIS_URL"], f"signup-{uuid.uuid4().hex[:6]}") as (port, proxy):
            tenant = make_tenant(unique("early"), "FREE")
            assert (await engine.reconcile_all(policies, [tenant])).tenants[0].ready
            db = tenant.database_name
            tenants = proxy.tenants  # served once its limits and its tier's PgBouncer are known here
            await asyncio.wait_for(tenants.changes.until(
                lambda: db in tenants.limits and tenants.limits[db].pool in tenants.pool_ports), 30)
            del tenants.limits[db]  # as if its change message were still on the way
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=db, database=db, ssl=False,
                                         password=secrets.passwords[tenant.key], statement_cache_size=0)
            try:
                assert await conn.fetchval("SELECT current_database()") == db
            finally:
                await conn.close()
            with pytest.raises(asyncpg.InvalidCatalogNameError):  # an unknown name is still refused
                await asyncpg.connect(host="127.0.0.1", port=port, user=db, database="no_such_tenant", ssl=False,
                                      password="x", statement_cache_size=0)
    finally:
        await close_engine(engine)


def test_only_what_agents_render_needs_their_confirmation() -> None:
    from dynabase.desired.pgbouncer import PgBouncerDesired, PoolSettings, TenantRoute

    pools = {"default.FREE": PoolSettings(pool_size=3)}
    before = PgBouncerDesired(dict(pools), {"a": TenantRoute("a", "a", "default.FREE")})
    plain = PgBouncerDesired(dict(pools), {**before.routes, "b": TenantRoute("b", "b", "default.FREE")})
    own = PgBouncerDesired(dict(pools), {**before.routes, "b": TenantRoute("b", "b", "default.FREE",
                                                                            PoolSettings(pool_size=9))})
    grown = PgBouncerDesired({**pools, "default.PRO": PoolSettings(pool_size=9)}, dict(plain.routes))
    assert plain.version != before.version and plain.rendered_version == before.rendered_version
    assert own.rendered_version != before.rendered_version
    assert grown.rendered_version != plain.rendered_version


async def test_a_new_tenant_in_a_running_pool_does_not_wait_for_the_agents(stack: Stack) -> None:
    from dynabase.backends.pgbouncer import PgBouncerBackend

    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    backend = engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    waits: list[int] = []
    real_wait = backend.wait_confirmed

    async def counted(seq: int) -> Any:
        waits.append(seq)
        return await real_wait(seq)

    backend.wait_confirmed = counted  # type: ignore[method-assign]
    # A policy of its own: its PgBouncer pools are this test's alone (other modules' engines and
    # operators publish pools of a policy named "default" to the same layout).
    name = unique("pgbpolicy").replace("_", "-")
    policies = {name: policy(name, None)}
    try:
        first = await engine.reconcile_all(policies, [pooled_tenant(unique("pgb"), name)])
        assert first.tenants[0].ready, first.tenants[0].outcomes
        waits.clear()
        second = await engine.reconcile_all(policies, [pooled_tenant(unique("pgb"), name)])
        assert second.tenants[0].ready, second.tenants[0].outcomes
        assert waits == [] and backend.writes == 2  # published, nothing to wait for
        own = await engine.reconcile_all(policies, [make_tenant(unique("pgb"), "FREE", tierPolicyRef=name,
                                                                overrides={"pgbouncer": {"poolSize": 2}})])
        assert own.tenants[0].ready and len(waits) == 1  # an entry of its own: the agents confirm it
    finally:
        await close_engine(engine)
