"""The engine's pass protocol and order, and the pure decisions the passes use (no servers)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import pytest

from dynabase.desired.effective import effective_limits
from dynabase.desired.lifecycle import phase
from dynabase.desired.overage import decide_overage, usage_outcome
from dynabase.desired.pgbouncer import layout, pool_name
from dynabase.desired.postgres import deletion_target, lowers_connection_limit, tenant_target
from dynabase.desired.postgres_observed import ObservedRole, PostgresObserved
from dynabase.desired.proxy import lowers, proxy_limits, restricted
from dynabase.desired.transition import decide_tier
from dynabase.engine.passes.base import BackendPass, PassRun, Phase
from dynabase.engine.passes.order import ORDER, Step, run_in_order
from dynabase.engine.results import TenantResult
from dynabase.engine.tiers import resolve

from .engine_helpers import example_policy, make_tenant

POLICY = example_policy()
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def resolved(db: str, tier: str, **spec: object) -> TenantResult:
    return resolve(make_tenant(db, tier, **spec), {"default": POLICY}, None, NOW)


# -- the order and the protocol ------------------------------------------------------


def test_the_order_is_the_documented_one() -> None:
    assert [(s.backend, s.phase) for s in ORDER if s.phase is not Phase.OBSERVE] == [
        ("proxy", Phase.FALLING), ("postgres", Phase.RISING), ("pgbouncer", Phase.ALL),
        ("postgres", Phase.FALLING), ("redis", Phase.ALL), ("mongo", Phase.ALL), ("railway", Phase.ALL),
        ("proxy", Phase.RISING),
    ]
    assert ORDER[0] == Step("postgres", Phase.OBSERVE)  # Postgres is read before anything changes


class Recording(BackendPass):
    condition = "RecordingReady"

    def __init__(self, run: PassRun, name: str, calls: list[str], *, broken: bool = False) -> None:
        super().__init__(run)
        self.name, self.calls, self.broken = name, calls, broken

    async def observe(self) -> None:
        self.calls.append(f"{self.name}.observe")
        if self.broken:
            raise ConnectionRefusedError("backend down")

    def plan(self) -> None:
        self.calls.append(f"{self.name}.plan")

    async def apply(self, phase: Phase) -> None:
        self.calls.append(f"{self.name}.{phase.value}")

    def affected(self) -> Sequence[TenantResult]:
        return self.run.results


def run_of(results: list[TenantResult], *, dry_run: bool) -> PassRun:
    return PassRun(results, [], {"default": POLICY}, dry_run, complete=True, concurrency=2)


async def test_each_pass_observes_once_at_its_first_step_then_applies_its_phases_in_order() -> None:
    calls: list[str] = []
    run = run_of([], dry_run=False)
    names = ("postgres", "proxy", "pgbouncer", "redis", "mongo", "railway")
    await run_in_order({n: Recording(run, n, calls) for n in names})
    assert calls == [
        "postgres.observe", "postgres.plan",
        "proxy.observe", "proxy.plan", "proxy.falling",
        "postgres.rising",
        "pgbouncer.observe", "pgbouncer.plan", "pgbouncer.all",
        "postgres.falling",
        "redis.observe", "redis.plan", "redis.all",
        "mongo.observe", "mongo.plan", "mongo.all",
        "railway.observe", "railway.plan", "railway.all",
        "proxy.rising",
    ]


async def test_a_dry_run_observes_and_plans_but_applies_nothing() -> None:
    calls: list[str] = []
    run = run_of([], dry_run=True)
    await run_in_order({n: Recording(run, n, calls) for n in ("postgres", "proxy")})
    assert calls == ["postgres.observe", "postgres.plan", "proxy.observe", "proxy.plan"]


async def test_a_backend_that_cannot_be_observed_is_each_tenants_condition_and_the_others_go_on() -> None:
    calls: list[str] = []
    result = resolved("obs_fail", "FREE")
    run = run_of([result], dry_run=False)
    await run_in_order({"proxy": Recording(run, "proxy", calls, broken=True),
                        "redis": Recording(run, "redis", calls)})
    assert calls == ["proxy.observe", "redis.observe", "redis.plan", "redis.all"]  # no plan, no apply for proxy
    [outcome] = result.outcomes
    assert (outcome.condition_type, outcome.ok, outcome.reason) == ("RecordingReady", False, "ObserveFailed")
    assert outcome.message == "ConnectionRefusedError: backend down"
    assert not result.ready


async def test_a_pass_without_a_step_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\['kafka'\] have no step"):
        await run_in_order({"kafka": Recording(run_of([], dry_run=False), "kafka", [])})


# -- pure decisions ------------------------------------------------------------------


def test_proxy_limits_fall_when_connections_or_rate_fall_and_unlimited_is_highest() -> None:
    free = resolved("lp", "FREE").decision
    assert free is not None
    base = proxy_limits("t/a", "a", "default.FREE", free.limits)
    assert not lowers(None, base)
    assert lowers(base, dataclasses.replace(base, max_connections=base.max_connections - 1))
    assert not lowers(base, dataclasses.replace(base, max_connections=base.max_connections + 1))
    unlimited, one_per_second = dataclasses.replace(base, qps=None), dataclasses.replace(base, qps=1)
    assert lowers(unlimited, one_per_second) and not lowers(one_per_second, unlimited)


def test_a_qps_restriction_caps_the_rate_and_read_only_restricts_postgres() -> None:
    free = resolved("rq", "FREE").decision
    assert free is not None
    limits = proxy_limits("t/a", "a", "default.FREE", free.limits)
    assert restricted(limits, None, 2) == limits and restricted(limits, "readOnly", 2) == limits
    capped = restricted(dataclasses.replace(limits, qps=None), "qps", 2)
    assert (capped.qps, capped.burst) == (2, 2)
    assert restricted(dataclasses.replace(limits, qps=1, burst=1), "qps", 2).qps == 1  # never raised
    tenant = make_tenant("ro", "FREE")
    read_only = tenant_target(tenant, free.limits, password=None, restriction="readOnly", cold=False)
    assert read_only.settings["default_transaction_read_only"] == "on"
    assert "default_transaction_read_only" not in tenant_target(
        tenant, free.limits, password=None, restriction="qps", cold=False).settings


def test_connection_limits_fall_only_for_active_roles_and_negative_means_unlimited() -> None:
    free = resolved("cl", "FREE").decision
    assert free is not None
    tenant = make_tenant("cl", "FREE")
    target = tenant_target(tenant, free.limits, password=None, restriction=None, cold=False)

    def observed(limit: int) -> PostgresObserved:
        role = ObservedRole("cl", True, limit, frozenset(), {}, None)
        return PostgresObserved(roles={"cl": role}, databases={})

    want = target.connection_limit
    assert lowers_connection_limit(target, observed(want + 1)) and lowers_connection_limit(target, observed(-1))
    assert not lowers_connection_limit(target, observed(want)) and not lowers_connection_limit(target, observed(1))
    assert not lowers_connection_limit(deletion_target(tenant), observed(want + 1))
    assert not lowers_connection_limit(target, PostgresObserved(roles={}, databases={}))


def test_the_layout_routes_tenants_to_their_tier_pool_and_keeps_unresolvable_ones() -> None:
    a, b = make_tenant("lay_a", "FREE"), make_tenant("lay_b", "PRO")
    decision = decide_tier(a, POLICY, applied_tier=None, pending_tier=None, effective_at=None, now=NOW)
    first = layout({"default": POLICY}, [(a, decision), (b, None)], [], None, complete=True)
    assert set(first.pools) == {pool_name("default", t) for t in POLICY.spec.tiers}
    assert first.routes["lay_a"].pool == pool_name("default", "FREE") and "lay_b" not in first.routes
    patched = layout({"default": POLICY}, [(a, None)], [], first, complete=False)
    assert patched.routes["lay_a"] == first.routes["lay_a"]  # unresolvable now: still served as it was
    assert "lay_a" not in layout({"default": POLICY}, [], [a], first, complete=False).routes


def test_usage_outcome_announces_each_threshold_once_and_a_restriction_when_it_starts_and_lifts() -> None:
    billing = effective_limits(make_tenant("u", "FREE"), POLICY, "FREE").billing
    included = billing.included_vcpu_hours
    near = decide_overage(billing, included * 0.85, None, NOW)
    assert near is not None
    first = usage_outcome(near, billing, None)
    assert (first.ok, first.reason, first.crossed) == (True, "NearIncludedUsage", "80")
    assert [e[1] for e in first.events] == ["UsageWarning"]
    again = usage_outcome(near, billing, near.status)
    assert again.crossed is None and again.events == ()
    over = decide_overage(billing, included * 2, near.status, NOW)
    assert over is not None
    soft_over = usage_outcome(over, billing, near.status)
    assert (soft_over.ok, soft_over.advisory, soft_over.reason) == (False, True, "OverIncludedUsage")
    later = NOW + dt.timedelta(days=8)  # past FREE's soft-overage week, same month
    restricted_verdict = decide_overage(billing, included * 2, over.status, later)
    assert restricted_verdict is not None and restricted_verdict.restriction == billing.overage_restriction
    start = usage_outcome(restricted_verdict, billing, over.status)
    assert start.reason == "Restricted" and [e[1] for e in start.events] == ["UsageRestricted"]
    within = decide_overage(billing, 0, restricted_verdict.status, later)
    assert within is not None
    lifted = usage_outcome(within, billing, restricted_verdict.status)
    assert lifted.reason == "WithinIncludedUsage" and [e[1] for e in lifted.events] == ["UsageRestrictionLifted"]


@pytest.mark.parametrize(("suspended", "ready", "cold", "expected"), [
    (True, False, True, "Suspended"), (False, False, True, "Degraded"), (False, True, True, "Cold"),
    (False, True, False, "Active"),
])
def test_phase(suspended: bool, ready: bool, cold: bool, expected: str) -> None:
    assert phase(suspended=suspended, ready=ready, cold=cold) == expected
