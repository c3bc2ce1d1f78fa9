"""Tenant users, org records and usage rollups on the devstack's FerretDB (MongoDB wire protocol)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pymongo
import pytest
import redis

from dynabase.backends.mongo import MongoBackend
from dynabase.backends.proxy import ProxyBackend

from .conftest import Stack
from .engine_helpers import FakeClock, example_policy, make_engine, make_tenant, unique

pytestmark = pytest.mark.mongo
POLICIES = {"default": example_policy()}


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[tuple[Any, Any, Stack]]:
    stack.need("ferretdb")
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    engine.mongo = MongoBackend(stack.env["DYNABASE_MONGO_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    try:
        yield engine, secrets, stack
    finally:
        await engine.postgres.close()
        await engine.mongo.close()
        await engine.proxy.close()


def tenant_client(stack: Stack, db: str, password: str) -> pymongo.MongoClient[dict[str, Any]]:
    host = stack.env["DYNABASE_MONGO_URL"].split("@", 1)[1].split("/", 1)[0]
    return pymongo.MongoClient(f"mongodb://{host}/", username=db, password=password, authSource=db,
                               authMechanism="SCRAM-SHA-256", serverSelectionTimeoutMS=5000)


def admin(stack: Stack) -> pymongo.MongoClient[dict[str, Any]]:
    return pymongo.MongoClient(stack.env["DYNABASE_MONGO_URL"], serverSelectionTimeoutMS=5000)


async def test_tenant_user_authenticates_and_uses_its_database(env) -> None:  # type: ignore[no-untyped-def]
    engine, secrets, stack = env
    db = unique("mg")
    tenant = make_tenant(db, "PRO")
    result = await engine.reconcile_all(POLICIES, [tenant])
    outcome = next(o for o in result.tenants[0].outcomes if o.condition_type == "MongoReady")
    # FerretDB has no roles: reported, honestly, as a False condition that Ready notes.
    assert (outcome.ok, outcome.reason) == (False, "RolesUnsupported") and outcome.advisory
    assert result.tenants[0].ready
    client = tenant_client(stack, db, secrets.passwords[tenant.key])
    client[db].items.insert_one({"n": 1})
    assert client[db].items.count_documents({}) == 1
    with pytest.raises(pymongo.errors.OperationFailure):
        tenant_client(stack, db, "wrong")[db].command("ping")
    writes = engine.mongo.writes
    await engine.reconcile_all(POLICIES, [tenant])
    assert engine.mongo.writes == writes  # nothing drifted, nothing written


async def test_org_document_follows_tier_changes_and_is_written_only_on_change(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, stack = env
    db = unique("org")
    await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
    orgs = admin(stack).dynabase.organizations
    key = f"test/{db.replace('_', '-')}"
    first = orgs.find_one({"_id": key})
    assert first["tier"] == "FREE" and first["limits"]["proxy"]["qps"] == 10
    await engine.reconcile_all(POLICIES, [make_tenant(db, "FREE")])
    assert orgs.find_one({"_id": key})["updatedAt"] == first["updatedAt"]
    await engine.reconcile_all(POLICIES, [make_tenant(db, "PRO")])
    upgraded = orgs.find_one({"_id": key})
    assert upgraded["tier"] == "PRO" and upgraded["limits"]["postgres"]["connectionLimit"] == 50
    assert upgraded["updatedAt"] > first["updatedAt"]


async def test_usage_rollups_are_exact_under_retried_flushes(env) -> None:  # type: ignore[no-untyped-def]
    engine, _, stack = env
    tenant = f"test/{unique('use')}"
    hour = int(time.time() // 3600)
    server = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    key = f"dynabase:usage:{hour}"
    # Two proxy replicas' cumulative counters for this hour, written the way the proxies write them.
    server.hset(key, mapping={
        f"{tenant}|proxy-a": json.dumps({"queries": 120, "query_seconds": 1.5, "tier": "FREE"}),
        f"{tenant}|proxy-b": json.dumps({"queries": 30, "query_seconds": 0.5, "tier": "FREE"}),
    })
    await engine.rollup_usage()
    server.hset(key, f"{tenant}|proxy-a", json.dumps({"queries": 120, "query_seconds": 1.5, "tier": "FREE"}))
    await engine.rollup_usage()  # the same flush again (a retry): nothing may double
    await engine.rollup_usage()
    doc = admin(stack).dynabase.tenantUsage.find_one({"_id": f"{tenant}|{hour}"})
    assert doc["queries"] == 150 and doc["query_seconds"] == 2.0
    server.hset(key, f"{tenant}|proxy-a", json.dumps({"queries": 125, "query_seconds": 1.6, "tier": "FREE"}))
    await engine.rollup_usage()
    assert admin(stack).dynabase.tenantUsage.find_one({"_id": f"{tenant}|{hour}"})["queries"] == 155
    server.close()
