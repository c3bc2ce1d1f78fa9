"""QPS per organization (tier field proxy.qpsScope): the scope rule, the published limits
that carry it, the proxy sharing one limiter per budget, and two databases of one
organization through three proxy replicas against the devstack's Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dynabase import keyspace
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.effective import effective_limits
from dynabase.desired.proxy import (
    ProxyTenantLimits,
    QpsBudget,
    budget_owner,
    plan_lines,
    proxy_limits,
    qps_budgets,
    restricted,
)
from dynabase.engine.runtime import close_engine
from dynabase.proxy import wire
from dynabase.proxy.admission import rate_limit_error
from dynabase.proxy.coordinator import Coordinator
from dynabase.proxy.server import Proxy
from dynabase.proxy.tenants import Tenants
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import Stack
from .engine_helpers import FakeClock, make_engine, make_tenant
from .proxy_helpers import running_proxy
from .test_proxy_admission import ScriptedCoordination, Waiter


def entry(database: str, *, org: str | None = "acme", qps: int | None = 100, burst: int | None = None,
          tier: str = "PRO", scope: str = "organization", queue_ms: int = 1000,
          over_limit: str = "throttle") -> ProxyTenantLimits:
    return ProxyTenantLimits(f"ns/{database}", database, database, tier, "pool", 10, qps,
                             (burst or qps) if qps is not None else None, queue_ms, over_limit, None, None,
                             org_id=org, qps_scope=scope)


def table(*entries: ProxyTenantLimits) -> dict[str, ProxyTenantLimits]:
    return {e.database: e for e in entries}


# --- the scope rule ------------------------------------------------------------------------------


def test_databases_of_one_organization_share_its_tiers_budget() -> None:
    budgets = qps_budgets(table(entry("a"), entry("b"), entry("c", org="other")))
    assert budgets["a"] is budgets["b"]
    assert (budgets["a"].owner, budgets["a"].qps, budgets["a"].burst, budgets["a"].org_id) == ("org:acme", 100, 100,
                                                                                                  "acme")
    assert not budgets["a"].uneven
    assert budgets["c"].owner == "org:other" and budgets["c"] is not budgets["a"]


def test_an_organization_with_one_database_still_owns_the_budget() -> None:
    # A second database joining later draws on the same Redis schedule, not a fresh one.
    assert qps_budgets(table(entry("a")))["a"].owner == "org:acme"


def test_different_tiers_in_one_organization_share_the_most_generous_databases_limits_whole() -> None:
    free = entry("a_free", qps=10, burst=40, tier="FREE", queue_ms=5000)  # the larger queue timeout, but 10/s
    pro = entry("b_pro", qps=200, burst=200, tier="PRO", queue_ms=1000, over_limit="reject")
    budgets = qps_budgets(table(free, pro))
    assert budgets["a_free"] is budgets["b_pro"]
    budget = budgets["a_free"]
    # The highest qps wins, and its burst, queue timeout and overLimit come with it (one tier's settings).
    assert (budget.qps, budget.burst, budget.queue_timeout_ms, budget.over_limit, budget.tier, budget.source) == (
        200, 200, 1000, "reject", "PRO", "b_pro")
    assert budget.uneven  # logged by the proxy: the organization is mid-change or has an override
    # Never the sum: two databases do not buy twice the rate.
    assert qps_budgets(table(entry("a", qps=200), entry("b", qps=200)))["a"].qps == 200


def test_ties_go_by_burst_then_queue_timeout_then_throttle_then_name() -> None:
    assert qps_budgets(table(entry("a", burst=150), entry("b", burst=300)))["a"].source == "b"
    assert qps_budgets(table(entry("a", queue_ms=500), entry("b", queue_ms=900)))["a"].source == "b"
    assert qps_budgets(table(entry("a", over_limit="throttle"), entry("b", over_limit="reject")))["b"].source == "a"
    equal = qps_budgets(table(entry("b"), entry("a")))
    assert equal["a"].source == "a" and not equal["a"].uneven


def test_database_scope_unlimited_tiers_and_entries_without_an_org_keep_their_own() -> None:
    budgets = qps_budgets(table(
        entry("a"), entry("own", scope="database", qps=30), entry("free", qps=None), entry("old", org=None),
    ))
    assert budgets["own"].owner == "own" and budgets["own"].qps == 30 and budgets["own"].org_id is None
    assert "free" not in budgets  # unlimited: no budget, no limiter, draws on nothing
    assert budgets["old"].owner == "old"  # published by an engine before qpsScope: per database, as then
    assert budgets["a"].owner == "org:acme" and budgets["a"].qps == 100  # the others do not change it


def test_a_usage_restricted_database_is_held_to_a_budget_of_its_own() -> None:
    budgets = qps_budgets(table(restricted(entry("a", qps=200), "qps", 2), entry("b", qps=200)))
    assert (budgets["a"].owner, budgets["a"].qps) == ("a", 2)  # its restriction, not its organization's
    assert (budgets["b"].owner, budgets["b"].qps) == ("org:acme", 200)


def test_budget_owners_never_collide_with_database_names() -> None:
    # Database names are identifiers ([a-z_][a-z0-9_]*), so "org:..." is never one.
    assert budget_owner(entry("org", org="x")) == "org:x"
    assert budget_owner(entry("org", scope="database")) == "org"
    assert keyspace.lease_key("org:x", 4) != keyspace.lease_key("org", 4)
    assert keyspace.lease_key("org:acme", 8) == "dynabase:qps:org:acme:lanes8"


# --- the published limits --------------------------------------------------------------------------

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "p"},
    "spec": {"tiers": {"PRO": {"rank": 1, "proxy": {"qps": 200}},
                       "OWN": {"rank": 0, "proxy": {"qps": 50, "qpsScope": "database"}}}},
})


def test_the_platform_default_is_organization_and_a_tier_or_override_can_choose_database() -> None:
    tenant = make_tenant("db_a", "PRO")
    published = proxy_limits(tenant.key, "db_a", "pool", effective_limits(tenant, POLICY, "PRO"),
                             org_id=tenant.spec.org_id)
    assert (published.org_id, published.qps_scope) == ("org-db_a", "organization")
    assert budget_owner(published) == "org:org-db_a"
    assert "shared by organization org-db_a" in plan_lines(None, published)[0]
    own = effective_limits(make_tenant("db_b", "OWN"), POLICY, "OWN")
    assert own.proxy.qps_scope == "database"
    overridden = make_tenant("db_c", "PRO", overrides={"proxy": {"qpsScope": "database"}})
    assert effective_limits(overridden, POLICY, "PRO").proxy.qps_scope == "database"


def test_a_wrong_scope_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="qpsScope"):
        TierPolicy.model_validate({
            "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "p"},
            "spec": {"tiers": {"T": {"rank": 0, "proxy": {"qps": 5, "qpsScope": "tenant"}}}},
        })


def test_the_codec_carries_the_org_and_scope_and_reads_older_entries_as_per_database() -> None:
    published = entry("a")
    assert keyspace.decode_limits(keyspace.encode_limits(published)) == published
    older = {k: v for k, v in dataclasses.asdict(published).items() if k not in ("org_id", "qps_scope")}
    decoded = keyspace.decode_limits(json.dumps(older))
    assert (decoded.org_id, decoded.qps_scope, budget_owner(decoded)) == (None, "database", "a")


# --- one limiter per budget on a replica -------------------------------------------------------------


async def test_an_organizations_databases_share_one_limiter_on_a_replica() -> None:
    tenants = Tenants(ScriptedCoordination())
    tenants.limits = table(entry("a"), entry("b"), entry("own", scope="database"))
    a, b, own = tenants.get("a"), tenants.get("b"), tenants.get("own")
    assert a is not None and b is not None and own is not None
    assert a.limiter is not None and a.limiter is b.limiter and a.limiter.owner == "org:acme"
    assert own.limiter is not None and own.limiter is not a.limiter and own.limiter.owner == "own"
    assert set(tenants.limiters) == {"org:acme", "own"}


async def test_a_change_to_one_database_reaches_the_budget_its_organization_shares() -> None:
    tenants = Tenants(ScriptedCoordination())
    tenants.limits = table(entry("a", qps=200), entry("b", qps=10, tier="FREE"))
    a, b = tenants.get("a"), tenants.get("b")
    assert a is not None and b is not None and a.limiter is not None and b.limiter is a.limiter
    shared = a.limiter
    assert shared.qps == 200
    waiter = Waiter()
    shared.waiters.append(waiter)
    tenants.limits = table(entry("a", qps=10, tier="FREE"), entry("b", qps=10, tier="FREE"))  # a downgraded
    tenants.applied(["a"])  # only a's entry changed: b's state follows its organization's budget too
    assert a.limiter is b.limiter and a.limiter is not shared and a.limiter.qps == 10
    assert b.budget is not None and b.budget.tier == "FREE"
    assert waiter.released == [False]  # queries waiting on the old budget ask the new one
    assert set(tenants.limiters) == {"org:acme"}


def test_the_rate_limit_error_names_the_organizations_budget() -> None:
    free = entry("a_free", qps=10, tier="FREE")
    budget = QpsBudget.of(entry("b_pro", qps=200), "org:acme")
    error = wire.error_fields(rate_limit_error(free, budget))
    assert error["C"] == "53400"
    assert error["M"] == ("query rate limit exceeded for tenant database a_free: tier PRO allows 200 queries per "
                          "second for all databases of organization acme together")
    alone = wire.error_fields(rate_limit_error(free, QpsBudget.of(free)))["M"]
    assert alone.endswith("tier FREE allows 10 queries per second")


# --- two databases of one organization through three proxy replicas ------------------------------------

ORG_QPS, OWN_QPS = 200, 100
REPLICAS = 3
CONNECTIONS = 4  # per database and replica: enough waiting queries to keep every replica over its share
LOAD_POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "orgqps"},
    "spec": {"tiers": {
        # The platform's default scope: the organization's databases share ORG_QPS.
        "ORG": {"rank": 1, "postgres": {"connectionLimit": 20}, "pgbouncer": {"poolSize": 4},
                "proxy": {"maxConnections": 20, "qps": ORG_QPS, "burst": ORG_QPS, "overLimit": "throttle",
                          "queueTimeout": "5s"}},
        "OWN": {"rank": 0, "postgres": {"connectionLimit": 20}, "pgbouncer": {"poolSize": 4},
                "proxy": {"maxConnections": 20, "qps": OWN_QPS, "burst": OWN_QPS, "overLimit": "throttle",
                          "queueTimeout": "5s", "qpsScope": "database"}},
    }},
})


@dataclass
class Replicas:
    proxies: list[tuple[int, Proxy]]
    tenants: dict[str, TenantDatabase]  # by database
    passwords: dict[str, str]  # by database
    org: str

    def databases(self, tier: str) -> list[str]:
        return sorted(db for db, t in self.tenants.items() if t.spec.tier == tier)

    def admitted(self, databases: list[str]) -> int:
        """Queries the replicas forwarded for these databases so far."""
        return sum(proxy.tenants.states[db].usage.queries for _, proxy in self.proxies for db in databases
                   if db in proxy.tenants.states)

    def leases(self) -> int:
        return sum(coordinator(proxy).lease_calls for _, proxy in self.proxies)


def coordinator(proxy: Proxy) -> Coordinator:
    assert isinstance(proxy.coordination, Coordinator)
    return proxy.coordination


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas(stack: Stack) -> AsyncIterator[Replicas]:
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    redis_url = stack.env["DYNABASE_REDIS_URL"]
    engine.pgbouncer = PgBouncerBackend(redis_url)
    engine.proxy = ProxyBackend(redis_url)
    suffix = uuid.uuid4().hex[:6]
    org = f"org-{suffix}"  # a fresh schedule in Redis
    tenants = {}
    for tier, names in (("ORG", ("a", "b")), ("OWN", ("c", "d"))):
        for name in names:
            db = f"oq_{name}_{suffix}"
            tenants[db] = TenantDatabase.model_validate({
                "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                "metadata": {"name": db.replace("_", "-"), "namespace": "orgqps", "generation": 1},
                "spec": {"orgId": org, "tier": tier, "tierPolicyRef": "orgqps", "databaseName": db},
            })
    result = await engine.reconcile_all({"orgqps": LOAD_POLICY}, list(tenants.values()))
    assert all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    try:
        async with contextlib.AsyncExitStack() as running:
            proxies = [await running.enter_async_context(running_proxy(redis_url, f"orgqps-{suffix}-{i}"))
                       for i in range(REPLICAS)]
            for _, proxy in proxies:
                for db in tenants:
                    await asyncio.wait_for(proxy.serves(db, lambda limits: limits.org_id == org), 30)
            yield Replicas(proxies, tenants, {db: str(secrets.passwords[t.key]) for db, t in tenants.items()}, org)
    finally:
        await close_engine(engine)


@contextlib.asynccontextmanager
async def offered(replicas: Replicas, databases: list[str]) -> AsyncIterator[None]:
    """Clients of these databases on every replica, each sending SELECT 1 as fast as it is let
    through (throttled queries wait for their slot), until the block ends."""
    connections: list[asyncpg.Connection] = []
    for port, _ in replicas.proxies:
        for db in databases:
            for _ in range(CONNECTIONS):
                connections.append(await asyncpg.connect(
                    host="127.0.0.1", port=port, user=db, database=db, password=replicas.passwords[db], ssl=False,
                    statement_cache_size=0))

    async def loop(conn: asyncpg.Connection) -> None:
        while True:
            try:
                await conn.execute("SELECT 1")
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "53400", exc  # refused after its queue timeout: ask again

    tasks = [asyncio.create_task(loop(conn)) for conn in connections]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in connections:
            conn.terminate()
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def every_replica_counts(replicas: Replicas, count: int) -> None:
    """Each replica knows how many replicas share the budgets (it sizes its leases by it)."""
    for _, proxy in replicas.proxies:
        await asyncio.wait_for(proxy.tenants.changes.until(lambda p=proxy: p.tenants.replicas == count), 30)


async def measure(replicas: Replicas, databases: list[str], warm_up: float, window: float) -> dict[str, Any]:
    """Admitted queries and leases in a window after the warm-up (the burst spent, leases grown):
    the steady state. The window is the rate limit's own unit, so it is real time."""
    await asyncio.sleep(warm_up)
    started, leases = time.monotonic(), replicas.leases()
    admitted = {db: replicas.admitted([db]) for db in databases}
    await asyncio.sleep(window)
    elapsed = time.monotonic() - started
    per_database = {db: replicas.admitted([db]) - admitted[db] for db in databases}
    total = sum(per_database.values())
    return {"elapsed": elapsed, "admitted": total, "per_database": per_database,
            "leases": replicas.leases() - leases}


async def test_two_databases_of_one_organization_share_its_budget_over_three_replicas(replicas: Replicas,
                                                                                      stack: Stack) -> None:
    await every_replica_counts(replicas, REPLICAS)
    a, b = replicas.databases("ORG")
    async with offered(replicas, [a, b]):
        found = await measure(replicas, [a, b], warm_up=3.0, window=8.0)
    ratio = found["admitted"] / (ORG_QPS * found["elapsed"])
    per_query = found["leases"] / found["admitted"]
    print(f"organization budget {ORG_QPS}/s over {REPLICAS} replicas: admitted {found['per_database']} in "
          f"{found['elapsed']:.2f} s = {ratio:.3f} of the budget; {found['leases']} leases = {per_query:.4f} "
          "per admitted query")
    assert 0.95 <= ratio <= 1.05, found  # the two databases together, not 2x
    assert min(found["per_database"].values()) > 0  # both drew on it
    assert per_query <= 0.01, found  # as few leases as one database's budget needs
    for _, proxy in replicas.proxies:  # one limiter per budget on each replica, shared by the org's databases
        limiter = proxy.tenants.states[a].limiter
        assert limiter is not None and limiter is proxy.tenants.states[b].limiter
        assert limiter.owner == f"org:{replicas.org}"
    client = aioredis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        lanes = replicas.proxies[0][1].tenants.states[a].limiter.schedule.lanes  # type: ignore[union-attr]
        assert await client.exists(keyspace.lease_key(f"org:{replicas.org}", lanes))
        assert not await client.exists(keyspace.lease_key(a, lanes), keyspace.lease_key(b, lanes))
    finally:
        await client.aclose()


async def test_with_database_scope_each_database_of_the_organization_has_its_own_budget(
        replicas: Replicas) -> None:
    await every_replica_counts(replicas, REPLICAS)
    c, d = replicas.databases("OWN")
    async with offered(replicas, [c, d]):
        found = await measure(replicas, [c, d], warm_up=2.0, window=5.0)
    ratios = {db: n / (OWN_QPS * found["elapsed"]) for db, n in found["per_database"].items()}
    print(f"database scope, {OWN_QPS}/s each over {REPLICAS} replicas: {ratios}, "
          f"{found['leases'] / found['admitted']:.4f} leases per admitted query")
    assert all(0.95 <= ratio <= 1.05 for ratio in ratios.values()), found
    for _, proxy in replicas.proxies:
        own_c, own_d = proxy.tenants.states[c].limiter, proxy.tenants.states[d].limiter
        assert own_c is not None and own_d is not None and own_c is not own_d
        assert (own_c.owner, own_d.owner) == (c, d)
