"""Per-tenant Redis isolation and quotas, on the devstack's real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from dynabase.backends.redis_acl import RedisBackend
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine, unique

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "redistest"},
    "spec": {"tiers": {"SMALL": {"rank": 0, "redis": {"maxKeys": 5}}, "LARGE": {"rank": 1, "redis": {"maxKeys": 100}}}},
})
POLICIES = {"redistest": POLICY}


def make(db: str, tier: str = "SMALL", **spec: Any) -> TenantDatabase:
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "redis", "generation": 1},
        "spec": {"orgId": "org", "tier": tier, "tierPolicyRef": "redistest", "databaseName": db, **spec},
    })


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[tuple[Any, Any, Stack]]:
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    engine.redis = RedisBackend(stack.env["DYNABASE_REDIS_URL"])
    try:
        yield engine, secrets, stack
    finally:
        await engine.postgres.close()
        await engine.redis.close()


def as_tenant(stack: Stack, db: str, password: str) -> redis.Redis:
    port = int(stack.env["DYNABASE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    return redis.Redis(host="127.0.0.1", port=port, username=f"tenant_{db}", password=password,
                       decode_responses=True)


def admin(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)


async def test_tenants_cannot_reach_each_others_keys(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, stack = env
    a, b = make(unique("ra")), make(unique("rb"))
    result = await engine.reconcile_all(POLICIES, [a, b])
    assert all(o.ok for r in result.tenants for o in r.outcomes if o.condition_type == "RedisReady")
    ca = as_tenant(stack, a.database_name, secrets.passwords[a.key])
    cb = as_tenant(stack, b.database_name, secrets.passwords[b.key])
    ca.set(f"t:{a.database_name}:x", "1")
    cb.set(f"t:{b.database_name}:secret", "b's data")
    assert ca.get(f"t:{a.database_name}:x") == "1"
    denied = [
        lambda: ca.get(f"t:{b.database_name}:secret"),
        lambda: ca.set(f"t:{b.database_name}:secret", "overwritten"),
        lambda: ca.delete(f"t:{b.database_name}:secret"),
        lambda: ca.keys("*"),
        lambda: ca.scan(0),
        lambda: ca.randomkey(),
        lambda: ca.flushall(),
        lambda: ca.flushdb(),
        lambda: ca.config_get("*"),
        lambda: ca.execute_command("SELECT", "1"),
        lambda: ca.execute_command("ACL", "LIST"),
        lambda: ca.publish(f"t:{b.database_name}:chan", "hi"),
    ]
    for attempt in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert cb.get(f"t:{b.database_name}:secret") == "b's data"
    with pytest.raises(redis.exceptions.AuthenticationError):
        as_tenant(stack, a.database_name, "wrong").ping()


async def test_over_quota_is_demoted_then_restored(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, stack = env
    tenant = make(unique("rq"))
    await engine.reconcile_all(POLICIES, [tenant])
    client = as_tenant(stack, tenant.database_name, secrets.passwords[tenant.key])
    prefix = f"t:{tenant.database_name}:"
    for i in range(8):
        client.set(f"{prefix}{i}", "v")
    result = await engine.reconcile_all(POLICIES, [tenant])
    redis_ready = next(o for o in result.tenants[0].outcomes if o.condition_type == "RedisReady")
    assert not redis_ready.ok and redis_ready.reason == "QuotaExceeded" and "8 keys" in redis_ready.message
    assert ("Warning", "RedisQuotaExceeded") in [(t, r) for t, r, _ in result.tenants[0].events]
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set(f"{prefix}9", "v")
    assert client.get(f"{prefix}1") == "v"  # reads still work
    client.delete(*[f"{prefix}{i}" for i in range(4)])  # deleting is how it gets back under
    restored = await engine.reconcile_all(POLICIES, [tenant])
    redis_ready = next(o for o in restored.tenants[0].outcomes if o.condition_type == "RedisReady")
    assert redis_ready.ok, redis_ready
    client.set(f"{prefix}new", "v")


async def test_manual_acl_change_is_reverted_and_a_quiet_pass_writes_nothing(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, stack = env
    tenant = make(unique("rd"))
    await engine.reconcile_all(POLICIES, [tenant])
    name = f"tenant_{tenant.database_name}"
    server = admin(stack)
    server.execute_command("ACL", "SETUSER", name, "~*", "+@all")
    client = as_tenant(stack, tenant.database_name, secrets.passwords[tenant.key])
    assert isinstance(client.keys("*"), list)  # the drift is real: KEYS works for it now
    await engine.reconcile_all(POLICIES, [tenant])
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.keys("*")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get("someone:else")

    def setuser_calls() -> int:
        stats = server.info("commandstats")
        return int(stats.get("cmdstat_acl|setuser", {}).get("calls", 0))

    before, writes = setuser_calls(), engine.redis.writes
    await engine.reconcile_all(POLICIES, [tenant])
    assert engine.redis.writes == writes
    assert setuser_calls() == before  # the server agrees: no ACL SETUSER at all


async def test_delete_removes_the_user_and_with_delete_the_keys(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, stack = env
    keep, drop = make(unique("rk")), make(unique("rx"), deletionPolicy="Delete")
    await engine.reconcile_all(POLICIES, [keep, drop])
    for tenant in (keep, drop):
        as_tenant(stack, tenant.database_name, secrets.passwords[tenant.key]).set(
            f"t:{tenant.database_name}:k", "v")
    await engine.reconcile_all(POLICIES, [], deleted=[keep, drop])
    server = admin(stack)
    assert server.acl_getuser(f"tenant_{keep.database_name}") is None
    assert server.acl_getuser(f"tenant_{drop.database_name}") is None
    assert server.get(f"t:{keep.database_name}:k") == "v"
    assert server.get(f"t:{drop.database_name}:k") is None
