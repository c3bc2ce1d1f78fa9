"""A declaration the engine cannot use is refused where it is made, or says so on its own status.

- The apiserver refuses what ``dynabase validate`` refuses (``workMem: 4GB``).
- A TierPolicy the engine cannot use (a tier broken by the defaults it leaves to, or a spec
  stored before the CRD was tightened) is Ready=False on its status with the field and the
  message; a usable one is Ready=True with the tenants using it. Their tenants, and tenants
  of a missing policy, are Ready=False naming it. ``kubectl get tierpolicies`` shows both.
- Headless mode shows the same on ``/status``; ``dynabase validate`` and ``plan`` print it.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from dynabase import cli
from dynabase.desired.declared_status import (
    PolicyUse,
    invalid_tenant_status,
    policy_statuses,
    unusable_status,
    usable_status,
)
from dynabase.desired.effective import ResolveError, effective_limits, find_policy, merge
from dynabase.desired.pgbouncer import layout
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource
from dynabase.spec import TenantDatabaseStatus, TierPolicy
from dynabase.spec.crd import all_crds
from dynabase.spec.tenant import Condition

from .conftest import ROOT, Stack
from .engine_helpers import FakeClock, make_engine, make_tenant
from .manifests import policy as policy_yaml
from .manifests import tenant as tenant_yaml
from .test_operator import Operator, condition, get, kube_wait

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
POOL_MESSAGE = "pgbouncer.poolSize + reservePoolSize must not exceed postgres.connectionLimit"
WORK_MEM_MESSAGE = "workMem must be between 64kB and 2GB (got 4GB)"


def _policy(name: str, tiers: dict[str, Any], generation: int = 1) -> TierPolicy:
    return TierPolicy.model_validate({"apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy",
                                      "metadata": {"name": name, "generation": generation},
                                      "spec": {"tiers": tiers}})


# A pool of 20 against the default connectionLimit of 10: the CRD cannot see the default.
BROKEN_TIERS = {"FREE": {"rank": 0, "pgbouncer": {"poolSize": 20}}, "PRO": {"rank": 1}}


# -- decided without servers ---------------------------------------------------------


def test_a_tier_broken_by_its_defaults_is_the_policys_problem_and_its_tenants() -> None:
    policy = _policy("broken", BROKEN_TIERS)
    uses = [PolicyUse("ns/a", "FREE"), PolicyUse("ns/b", "FREE"), PolicyUse("ns/c", "PRO")]
    status = usable_status(policy, uses, None, NOW)
    ready = status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "InvalidTier")
    assert "spec.tiers.FREE.pgbouncer.poolSize" in ready.message and "2 tenants on them" in ready.message
    [problem] = status.problems
    assert (problem.tier, problem.field, problem.tenants) == ("FREE", "spec.tiers.FREE.pgbouncer.poolSize", 2)
    assert POOL_MESSAGE in problem.message and "postgres.connectionLimit 10" in problem.message
    assert (status.tenants, status.tenant_names, status.observed_generation) == (3, ["ns/a", "ns/b", "ns/c"], 1)
    # The tenant's own error says where to fix it: its tier, or its overrides.
    with pytest.raises(ResolveError) as bare:
        effective_limits(make_tenant("a", "FREE"), policy, "FREE")
    assert bare.value.field == "spec.tier" and "tier FREE of TierPolicy 'broken'" in bare.value.message
    with pytest.raises(ResolveError) as overridden:
        effective_limits(make_tenant("b", "FREE", overrides={"postgres": {"connectionLimit": 12}}), policy, "FREE")
    assert overridden.value.field == "spec.overrides.pgbouncer.poolSize"
    fixed = make_tenant("c", "FREE", overrides={"postgres": {"connectionLimit": 30}})
    assert effective_limits(fixed, policy, "FREE").pgbouncer.pool_size == 20


def test_a_usable_policy_is_ready_with_its_tenants_and_keeps_its_transition_time() -> None:
    policy = _policy("fine", {"FREE": {"rank": 0}, "PRO": {"rank": 1}})
    uses = [PolicyUse(f"ns/t{i:02}", "FREE") for i in range(25)]
    first = usable_status(policy, uses, None, NOW)
    ready = first.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("True", "Usable")
    assert ready.message == "2 tier(s) usable; 25 tenants use the policy"
    assert first.tenants == 25 and first.tenant_names == [f"ns/t{i:02}" for i in range(20)] and not first.problems
    later = usable_status(policy, uses[:3], first, NOW + dt.timedelta(hours=1))
    again = later.condition("Ready")
    assert again is not None and again.last_transition_time == NOW and later.tenants == 3


def test_a_policy_that_does_not_validate_is_named_by_its_tenants() -> None:
    errors = [("spec.tiers.FREE.postgres.workMem", WORK_MEM_MESSAGE)]
    status = unusable_status(4, errors, [PolicyUse("ns/a", "FREE")], None, NOW)
    ready = status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert f"spec.tiers.FREE.postgres.workMem: {WORK_MEM_MESSAGE}" in ready.message
    assert status.problems[0].tier == "FREE" and status.observed_generation == 4
    tenant = make_tenant("a", "FREE", tierPolicyRef="stale")
    with pytest.raises(ResolveError) as info:
        find_policy(tenant, {}, {"stale": "spec.tiers.FREE.postgres.workMem: " + WORK_MEM_MESSAGE})
    assert info.value.reason == "TierPolicyInvalid" and "TierPolicy 'stale' cannot be used" in info.value.message
    assert WORK_MEM_MESSAGE in info.value.message and info.value.field == "spec.tierPolicyRef"
    with pytest.raises(ResolveError) as missing:
        find_policy(tenant, {}, {})
    assert missing.value.reason == "TierPolicyNotFound"


def test_an_invalid_tenant_keeps_what_was_applied_and_says_why() -> None:
    previous = TenantDatabaseStatus(applied_tier="PRO", phase="Active", conditions=[
        Condition(type="Ready", status="True", reason="Reconciled", last_transition_time=NOW)])
    errors = [("spec.overrides.postgres.workMem", WORK_MEM_MESSAGE)]
    status = invalid_tenant_status(3, errors, previous, NOW + dt.timedelta(minutes=5))
    ready = status.condition("Ready")
    assert status.phase == "Degraded" and status.applied_tier == "PRO" and status.observed_generation == 3
    assert ready is not None and (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert f"spec.overrides.postgres.workMem: {WORK_MEM_MESSAGE}" in ready.message
    assert invalid_tenant_status(3, errors, status, NOW + dt.timedelta(hours=1)) == status  # nothing to write


def test_the_pgbouncer_layout_keeps_the_pool_of_a_tenant_it_cannot_resolve() -> None:
    policy = _policy("p", {"FREE": {"rank": 0}})
    tenant = make_tenant("keep_pool", "FREE", tierPolicyRef="p")
    from dynabase.desired.transition import decide_tier

    decision = decide_tier(tenant, policy, applied_tier=None, pending_tier=None, effective_at=None, now=NOW)
    published = layout({"p": policy}, [(tenant, decision)], [], None, complete=True)
    # The policy became unusable: the tenant is unresolved and no pool of "p" is rebuilt.
    rebuilt = layout({}, [(tenant, None)], [], published, complete=True)
    route = rebuilt.routes["keep_pool"]
    assert route == published.routes["keep_pool"] and route.pool in rebuilt.pools
    assert merge("FREE", 0, []).pgbouncer.pool_size == rebuilt.pools[route.pool].pool_size


def test_validate_refuses_what_the_engine_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(_policy("broken", BROKEN_TIERS).model_dump(
        mode="json", by_alias=True, exclude_none=True)))
    (tmp_path / "a.yaml").write_text(tenant_yaml("a", "orgId: o\ntier: FREE\ntierPolicyRef: broken\n"))
    (tmp_path / "b.yaml").write_text(tenant_yaml("b", "orgId: o\ntier: PRO\ntierPolicyRef: broken\n"))
    assert cli.main(["validate", str(tmp_path)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert f"policy.yaml:1: TierPolicy/broken: spec.tiers.FREE.pgbouncer.poolSize: {POOL_MESSAGE}" in err
    assert "a.yaml:1: TenantDatabase/a: spec.tier: tier FREE of TierPolicy 'broken'" in err
    assert "TenantDatabase/b" not in err and "2 error(s)" in err
    # Tenants alone are judged by the schema only: their policy may be declared elsewhere.
    assert cli.main(["validate", str(tmp_path / "a.yaml")]) == cli.EXIT_OK


def test_plan_and_apply_print_each_policy_that_is_not_ready() -> None:
    policies = {"broken": _policy("broken", BROKEN_TIERS), "fine": _policy("fine", {"FREE": {"rank": 0}})}
    lines = cli._policy_problems(policies, [make_tenant("a", "FREE", tierPolicyRef="broken")])
    assert len(lines) == 1 and lines[0].startswith("TierPolicy broken: not ready (InvalidTier): 1 tier(s)")
    assert "(1 tenant on them)" in lines[0] and "spec.tiers.FREE.pgbouncer.poolSize" in lines[0]


# -- headless mode (the devstack's Postgres) --------------------------------------


async def test_headless_status_shows_each_policy_and_tenants_name_an_unusable_one(
        stack: Stack, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    (tmp_path / "good.yaml").write_text(policy_yaml("good", "FREE:\n  rank: 0\n"))
    (tmp_path / "broken.yaml").write_text(policy_yaml("broken", "FREE:\n  rank: 0\n  pgbouncer:\n    poolSize: 20\n"))
    (tmp_path / "stale.yaml").write_text(policy_yaml("stale", "FREE:\n  rank: 0\n  postgres:\n    workMem: 4GB\n"))
    for name, ref in (("on-good", "good"), ("on-broken", "broken"), ("on-stale", "stale")):
        (tmp_path / f"{name}.yaml").write_text(tenant_yaml(
            name, f"orgId: o\ntier: FREE\ntierPolicyRef: {ref}\ndatabaseName: hl_{name.replace('-', '_')}_{suffix}\n"))
    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], FakeClock())
    try:
        headless = HeadlessReconciler(engine, DirectorySource(tmp_path), clock=FakeClock())
        result = await headless.run_once()
    finally:
        await engine.postgres.close()
    assert result is not None
    by_name = {t.tenant.name: t for t in result.tenants}
    assert by_name["on-good"].ready
    broken_error, stale_error = by_name["on-broken"].error, by_name["on-stale"].error
    assert broken_error is not None and broken_error.reason == "InvalidLimits"
    assert stale_error is not None and stale_error.reason == "TierPolicyInvalid"
    assert "TierPolicy 'stale' cannot be used" in stale_error.message and WORK_MEM_MESSAGE in stale_error.message
    policies = headless.status()["policies"]
    assert set(policies) == {"good", "broken", "stale"}
    ready = {name: next(c for c in p["conditions"] if c["type"] == "Ready") for name, p in policies.items()}
    assert (ready["good"]["status"], policies["good"]["tenants"]) == ("True", 1)
    assert (ready["broken"]["reason"], policies["broken"]["problems"][0]["field"]) == (
        "InvalidTier", "spec.tiers.FREE.pgbouncer.poolSize")
    assert ready["stale"]["reason"] == "InvalidSpec" and WORK_MEM_MESSAGE in ready["stale"]["message"]
    assert policies["stale"]["tenantNames"] == ["default/on-stale"]
    json.dumps(policies)  # served as JSON on /status


def test_policy_statuses_judge_a_kept_last_good_version_as_unusable_too() -> None:
    good = _policy("p", {"FREE": {"rank": 0}})
    statuses = policy_statuses({"p": good}, {"p": [("spec.tiers.FREE.postgres.workMem", WORK_MEM_MESSAGE)]},
                               [], {}, NOW)
    ready = statuses["p"].condition("Ready")
    assert ready is not None and ready.reason == "InvalidSpec"
    assert "the last valid version of it stays in force" in ready.message


# -- the real apiserver and operator ------------------------------------------------

kube = pytest.mark.kube


def tp(stack: Stack, name: str) -> dict[str, Any]:
    out = stack.kubectl("get", "tierpolicy", name, "-o", "json", check=False)
    return cast(dict[str, Any], json.loads(out.stdout)) if out.returncode == 0 else {}


def tp_wait(stack: Stack, name: str, what: str, timeout: int = 60) -> dict[str, Any]:
    """`kubectl wait` (a watch) on a TierPolicy; the object as it is then."""
    done = stack.kubectl("wait", f"tierpolicy/{name}", f"--for={what}", f"--timeout={timeout}s", check=False)
    if done.returncode != 0:
        raise AssertionError(f"TierPolicy {name}: no {what} within {timeout}s ({done.stderr.strip()}); "
                             f"status: {json.dumps(tp(stack, name).get('status'), indent=1)}")
    return tp(stack, name)


@pytest.fixture(scope="module")
def operator(stack: Stack, crds_applied: None) -> Iterator[Operator]:
    namespace = f"decl-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    op = Operator(stack, namespace)
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _db(namespace: str, name: str) -> str:
    return f"{namespace}_{name}".replace("-", "_")


@kube
def test_the_apiserver_refuses_work_mem_4gb_with_the_message(stack: Stack, crds_applied: None) -> None:
    name = f"wm-{uuid.uuid4().hex[:6]}"
    refused = stack.kubectl("apply", "-f", "-", check=False,
                            input=policy_yaml(name, "FREE:\n  rank: 0\n  postgres:\n    workMem: 4GB\n"))
    assert refused.returncode != 0 and WORK_MEM_MESSAGE in refused.stderr, refused.stderr
    assert "spec.tiers[FREE].postgres.workMem" in refused.stderr
    assert stack.kubectl("get", "tierpolicy", name, check=False).returncode != 0  # nothing was stored


@kube
def test_policies_and_tenants_say_on_their_status_what_cannot_be_used(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    good, broken, missing = f"good-{ns}", f"broken-{ns}", f"missing-{ns}"
    stack.kubectl("apply", "-f", "-", input=policy_yaml(good, "FREE:\n  rank: 0\nPRO:\n  rank: 1\n"))
    stack.kubectl("apply", "-f", "-", input=policy_yaml(
        broken, "FREE:\n  rank: 0\n  pgbouncer:\n    poolSize: 20\nPRO:\n  rank: 1\n"))
    for name, ref, tier in (("g1", good, "FREE"), ("g2", good, "PRO"), ("b1", broken, "FREE"),
                            ("b2", broken, "PRO"), ("m1", missing, "FREE")):
        stack.kubectl("apply", "-f", "-", input=tenant_yaml(
            name, f"orgId: o\ntier: {tier}\ntierPolicyRef: {ref}\ndatabaseName: {_db(ns, name)}\n", ns))

    fine = tp_wait(stack, good, "jsonpath={.status.tenants}=2")
    ready = condition(fine, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Usable")
    assert fine["status"]["tenantNames"] == [f"{ns}/g1", f"{ns}/g2"]
    assert fine["status"]["observedGeneration"] == fine["metadata"]["generation"]

    bad = tp_wait(stack, broken, 'jsonpath={.status.conditions[?(@.type=="Ready")].reason}=InvalidTier')
    ready = condition(bad, "Ready")
    assert ready["status"] == "False" and "spec.tiers.FREE.pgbouncer.poolSize" in ready["message"]
    [problem] = bad["status"]["problems"]
    assert (problem["tier"], problem["field"]) == ("FREE", "spec.tiers.FREE.pgbouncer.poolSize")
    assert POOL_MESSAGE in problem["message"]

    # Tenants: on the broken tier, Ready=False naming it; on its other tier, Ready; of a missing policy, named.
    kube_wait(stack, ns, "condition=Ready", "g1", "g2", "b2")
    kube_wait(stack, ns, "condition=Ready=False", "b1", "m1")
    on_broken = condition(get(stack, ns, "b1"), "Ready")
    assert on_broken["reason"] == "InvalidLimits" and f"tier FREE of TierPolicy '{broken}'" in on_broken["message"]
    assert POOL_MESSAGE in on_broken["message"]
    on_missing = condition(get(stack, ns, "m1"), "Ready")
    assert on_missing["reason"] == "TierPolicyNotFound" and f"TierPolicy '{missing}' does not exist" in on_missing[
        "message"]

    # kubectl get tierpolicies: Ready and Tenants.
    table = stack.kubectl("get", "tierpolicies", good, broken).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "READY", "TENANTS"]
    rows = {line.split()[0]: line.split()[1:3] for line in table[1:]}
    assert rows == {good: ["True", "2"], broken: ["False", "2"]}

    # The set of tenants using a policy changes: its status follows.
    stack.kubectl("delete", "tdb", "g2", "-n", ns, "--wait=true", "--timeout=60s")
    after = tp_wait(stack, good, "jsonpath={.status.tenants}=1")
    assert after["status"]["tenantNames"] == [f"{ns}/g1"]
    # A fixed policy becomes Ready, and so does its tenant.
    fixed = "FREE:\n  rank: 0\n  postgres:\n    connectionLimit: 25\n  pgbouncer:\n    poolSize: 20\nPRO:\n  rank: 1\n"
    stack.kubectl("apply", "-f", "-", input=policy_yaml(broken, fixed))
    tp_wait(stack, broken, 'jsonpath={.status.conditions[?(@.type=="Ready")].status}=True')
    assert not tp(stack, broken)["status"].get("problems")
    kube_wait(stack, ns, "condition=Ready", "b1")


def _loosened(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as it was before workMem had a range: the range rule removed wherever workMem is."""
    loose = copy.deepcopy(crd)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            work_mem = node.get("properties", {}).get("workMem")
            if isinstance(work_mem, dict):
                work_mem["x-kubernetes-validations"] = [
                    r for r in work_mem.get("x-kubernetes-validations", []) if "between" not in str(r)]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(loose)
    return loose


def _apply_crds(stack: Stack, crds: list[dict[str, Any]]) -> None:
    stack.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                  input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}))


def _refuses(stack: Stack, manifest: str) -> bool:
    return stack.kubectl("create", "--dry-run=server", "-f", "-", input=manifest, check=False).returncode != 0


@kube
def test_declarations_stored_before_the_crd_was_tightened_say_so(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    stale = f"stale-{ns}"
    stale_policy = policy_yaml(stale, "FREE:\n  rank: 0\n  postgres:\n    workMem: 4GB\n")
    stale_tenant = tenant_yaml("old-override", "orgId: o\ntier: FREE\ntierPolicyRef: default\n"
                               f"databaseName: {_db(ns, 'old_override')}\noverrides:\n  postgres:\n    workMem: 4GB\n",
                               ns)
    crds = all_crds()
    try:
        _apply_crds(stack, [_loosened(crd) for crd in crds])
        stack.kubectl("wait", "--for", "condition=Established", "crd/tierpolicies.dynabase.io")
        _wait_until(lambda: not _refuses(stack, stale_policy), "the loosened CRD accepts workMem: 4GB")
        stack.kubectl("apply", "-f", "-", input=stale_policy)
        stack.kubectl("apply", "-f", "-", input=stale_tenant)
    finally:
        _apply_crds(stack, crds)
    _wait_until(lambda: _refuses(stack, stale_policy.replace(stale, stale + "-x")), "the CRD tightened again")
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    stack.kubectl("apply", "-f", "-", input=tenant_yaml(
        "on-stale", f"orgId: o\ntier: FREE\ntierPolicyRef: {stale}\ndatabaseName: {_db(ns, 'on_stale')}\n", ns))

    policy = tp_wait(stack, stale, 'jsonpath={.status.conditions[?(@.type=="Ready")].reason}=InvalidSpec')
    ready = condition(policy, "Ready")
    assert ready["status"] == "False"
    assert f"spec.tiers.FREE.postgres.workMem: {WORK_MEM_MESSAGE}" in ready["message"]
    assert policy["status"]["problems"][0]["field"] == "spec.tiers.FREE.postgres.workMem"

    kube_wait(stack, ns, "condition=Ready=False", "on-stale", "old-override")
    on_stale = condition(get(stack, ns, "on-stale"), "Ready")
    assert on_stale["reason"] == "TierPolicyInvalid" and f"TierPolicy '{stale}' cannot be used" in on_stale["message"]
    assert WORK_MEM_MESSAGE in on_stale["message"]
    old = get(stack, ns, "old-override")
    assert old["status"]["phase"] == "Degraded" and condition(old, "Ready")["reason"] == "InvalidSpec"
    assert f"spec.overrides.postgres.workMem: {WORK_MEM_MESSAGE}" in condition(old, "Ready")["message"]
    events = json.loads(stack.kubectl("get", "events", "-n", ns, "-o", "json", "--field-selector",
                                      "involvedObject.name=old-override,reason=InvalidSpec").stdout)["items"]
    assert len(events) == 1 and WORK_MEM_MESSAGE in events[0]["message"]  # once, not once per pass
    tp_wait(stack, stale, "jsonpath={.status.tenants}=1")
    # Deletion still works for a tenant the engine cannot use (its finalizer is released); leave
    # nothing unusable behind for the other tests' operators.
    stack.kubectl("delete", "tdb", "old-override", "on-stale", "-n", ns, "--wait=true", "--timeout=60s")
    stack.kubectl("delete", "tierpolicy", stale, "--wait=true", "--timeout=60s")


@kube
def test_the_operators_role_may_write_policy_status(stack: Stack, crds_applied: None) -> None:
    stack.kubectl("apply", "-f", str(ROOT / "manifests" / "namespace.yaml"))
    stack.kubectl("apply", "-n", "dynabase-system", "-f", str(ROOT / "manifests" / "rbac.yaml"))
    account = "system:serviceaccount:dynabase-system:dynabase-operator"
    for verb in ("get", "patch"):
        allowed = stack.kubectl("auth", "can-i", verb, "tierpolicies.dynabase.io", "--subresource=status",
                                f"--as={account}", check=False)
        assert allowed.stdout.strip() == "yes", (verb, allowed.stdout, allowed.stderr)
    spec = stack.kubectl("auth", "can-i", "update", "tierpolicies.dynabase.io", f"--as={account}", check=False)
    assert spec.stdout.strip() == "no"  # the declaration stays the user's


def _wait_until(check: Any, what: str, timeout: float = 30) -> None:
    """The apiserver announces no schema change: ask until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
