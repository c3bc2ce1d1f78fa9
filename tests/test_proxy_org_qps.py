"""QPS per organization (tier field proxy.qpsScope): the scope rule, the published limits
that carry it, the proxy sharing one limiter per budget, and two databases of one
organization through three proxy replicas against the devstack's Redis."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dynabase import keyspace
from dynabase.desired.effective import effective_limits
from dynabase.desired.proxy import ProxyTenantLimits, QpsBudget, budget_owner, plan_lines, proxy_limits, qps_budgets
from dynabase.proxy import wire
from dynabase.proxy.admission import rate_limit_error
from dynabase.proxy.tenants import Tenants
from dynabase.spec import TierPolicy

from .engine_helpers import make_tenant
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
    assert error["M"] == ("query rate limit exceeded for tenant database a_free: the databases of organization acme "
                          "share 200 queries per second (tier PRO)")
    alone = wire.error_fields(rate_limit_error(free, QpsBudget.of(free)))["M"]
    assert alone.endswith("tier FREE allows 10 queries per second")
