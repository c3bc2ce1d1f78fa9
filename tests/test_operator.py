"""End to end: the operator (a real subprocess) against the real kube-apiserver,
Postgres, PgBouncer agent and Redis of the devstack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from dynabase.desired.sql import quote_ident

from .conftest import ROOT, Stack
from .manifests import tenant

pytestmark = pytest.mark.kube
DRIFT_INTERVAL = 2.0


class Operator:
    def __init__(self, stack: Stack, namespace: str) -> None:
        self.stack, self.namespace = stack, namespace
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = stack.devstack.root / "logs" / f"operator-{namespace}.log"

    def start(self) -> None:
        env = {**os.environ, **self.stack.env, "DYNABASE_LOG_LEVEL": "INFO"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dynabase.cli", "operator", "--namespace", self.namespace,
                 "--drift-interval", str(DRIFT_INTERVAL), "--metrics-port", "0", "--liveness-port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def operator(stack: Stack, crds_applied: None) -> Iterator[Operator]:
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    op = Operator(stack, namespace)
    op.start()
    try:
        yield op
    finally:
        op.stop()


def get(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    out = stack.kubectl("get", "tdb", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rolconnlimit(stack: Stack, role: str) -> int | None:
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        row = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row[0] if row else None


def apply_tenant(stack: Stack, namespace: str, name: str, spec: str) -> None:
    stack.kubectl("apply", "-f", "-", input=tenant(name, spec, namespace))


def ready(stack: Stack, namespace: str, name: str) -> bool:
    return condition(get(stack, namespace, name), "Ready").get("status") == "True"


def test_examples_become_ready_with_their_limits(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    for path in sorted((ROOT / "examples" / "tenants").glob("*.yaml")):
        text = path.read_text().replace("namespace: default", f"namespace: {ns}")
        # Database names are cluster-wide: give this namespace its own.
        name = text.split("name: ", 1)[1].split("\n", 1)[0]
        text = text.replace("spec:\n", f"spec:\n  databaseName: {ns.replace('-', '_')}_{name.replace('-', '_')}\n", 1)
        text = text.replace("  databaseName: umbrella\n", "")
        stack.kubectl("apply", "-f", "-", input=text)
    expected = {"acme": 5, "globex": 50, "initech": 15, "umbrella-corp": 100}
    for name, limit in expected.items():
        wait_for(lambda name=name: ready(stack, ns, name), 60, f"{name} Ready")
        obj = get(stack, ns, name)
        assert obj["status"]["phase"] == "Active"
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert rolconnlimit(stack, obj["spec"]["databaseName"]) == limit
        assert condition(obj, "PostgresReady")["status"] == "True"
        assert condition(obj, "PgBouncerReady")["status"] == "True"
    table = stack.kubectl("get", "tdb", "-n", ns).stdout
    assert "Active" in table and "True" in table
    secret = stack.kubectl("get", "secret", "acme-dynabase-password", "-n", ns, "-o", "json").stdout
    assert json.loads(secret)["metadata"]["ownerReferences"][0]["kind"] == "TenantDatabase"
    status_text = json.dumps(get(stack, ns, "acme").get("status"))
    assert "SCRAM" not in status_text and "password" not in status_text.lower()


def test_tier_patch_goes_live_and_is_timed(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db = f"up_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "upgrader", f"orgId: o\ntier: FREE\ndatabaseName: {db}\n")
    wait_for(lambda: rolconnlimit(stack, db) == 5, 60, "FREE limit")
    started = time.monotonic()
    stack.kubectl("patch", "tdb", "upgrader", "-n", ns, "--type=merge", "-p", '{"spec":{"tier":"PRO"}}')
    wait_for(lambda: rolconnlimit(stack, db) == 50, 30, "PRO limit")
    elapsed = time.monotonic() - started
    print(f"patch -> limit live: {elapsed:.2f}s")
    assert wait_for(lambda: get(stack, ns, "upgrader").get("status", {}).get("appliedTier") == "PRO", 10)


def test_downgrade_waits_then_applies(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    policy = (ROOT / "examples" / "tierpolicy-default.yaml").read_text()
    policy = policy.replace("name: default", "name: quick")
    policy = policy.replace("downgradeGracePeriod: 15m", "downgradeGracePeriod: 4s")
    stack.kubectl("apply", "-f", "-", input=policy)
    db = f"down_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "downgrader", f"orgId: o\ntier: PRO\ntierPolicyRef: quick\ndatabaseName: {db}\n")
    wait_for(lambda: rolconnlimit(stack, db) == 50, 60, "PRO limit")
    stack.kubectl("patch", "tdb", "downgrader", "-n", ns, "--type=merge", "-p", '{"spec":{"tier":"FREE"}}')
    status = wait_for(lambda: (st := get(stack, ns, "downgrader").get("status", {})).get("pendingTier") == "FREE"
                      and st, 20, "pendingTier")
    assert status["appliedTier"] == "PRO" and status["effectiveAt"]
    assert rolconnlimit(stack, db) == 50
    header, row = stack.kubectl("get", "tdb", "downgrader", "-n", ns, "-o", "wide").stdout.splitlines()[:2]
    assert header.split()[2:5] == ["TIER", "APPLIED", "PENDING"] and row.split()[2:5] == ["FREE", "PRO", "FREE"]
    wait_for(lambda: rolconnlimit(stack, db) == 5, 20, "FREE limit after the grace period")
    final = get(stack, ns, "downgrader")["status"]
    assert final["appliedTier"] == "FREE" and not final.get("pendingTier")


def test_missing_tier_is_a_condition_and_others_are_unaffected(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db_bad, db_good = f"bad_{uuid.uuid4().hex[:6]}", f"good_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "no-such-tier", f"orgId: o\ntier: PLATINUM\ndatabaseName: {db_bad}\n")
    apply_tenant(stack, ns, "neighbour", f"orgId: o\ntier: STARTER\ndatabaseName: {db_good}\n")
    wait_for(lambda: ready(stack, ns, "neighbour"), 60, "neighbour Ready")
    bad = wait_for(lambda: condition(get(stack, ns, "no-such-tier"), "Ready") or None, 30, "a Ready condition")
    assert bad["status"] == "False" and bad["reason"] == "TierNotFound"
    assert "PLATINUM" in bad["message"] and "FREE" in bad["message"]
    assert rolconnlimit(stack, db_bad) is None


def test_manual_drift_is_reverted_within_one_interval(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db = f"drift_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "drifter", f"orgId: o\ntier: FREE\ndatabaseName: {db}\n")
    wait_for(lambda: ready(stack, ns, "drifter"), 60)
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"], autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {quote_ident(db)} CONNECTION LIMIT 999")
    started = time.monotonic()
    wait_for(lambda: rolconnlimit(stack, db) == 5, DRIFT_INTERVAL * 2 + 5, "drift reverted")
    assert time.monotonic() - started <= DRIFT_INTERVAL * 2 + 5


def test_steady_state_makes_no_api_writes(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db = f"calm_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "calm", f"orgId: o\ntier: PRO\ndatabaseName: {db}\n")
    wait_for(lambda: ready(stack, ns, "calm"), 60)
    time.sleep(DRIFT_INTERVAL)
    version = get(stack, ns, "calm")["metadata"]["resourceVersion"]
    time.sleep(DRIFT_INTERVAL * 3)  # several timer passes
    assert get(stack, ns, "calm")["metadata"]["resourceVersion"] == version


def test_operator_killed_mid_reconcile_converges_after_restart(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    names = [f"k{i}-{uuid.uuid4().hex[:4]}" for i in range(5)]
    for name in names:
        apply_tenant(stack, ns, name, f"orgId: o\ntier: STARTER\ndatabaseName: {name.replace('-', '_')}\n")
    time.sleep(0.3)
    operator.stop(signal.SIGKILL)
    operator.start()
    for name in names:
        wait_for(lambda name=name: ready(stack, ns, name), 90, f"{name} Ready after restart")
        assert rolconnlimit(stack, name.replace("-", "_")) == 10
        history = get(stack, ns, name).get("status", {}).get("history", [])
        assert [h["to"] for h in history] == ["STARTER"]  # applied once, not twice


def test_delete_with_retain_and_with_delete(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    keep, drop = f"keep_{uuid.uuid4().hex[:6]}", f"drop_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "keeper", f"orgId: o\ntier: FREE\ndatabaseName: {keep}\n")
    apply_tenant(stack, ns, "dropper", f"orgId: o\ntier: FREE\ndatabaseName: {drop}\ndeletionPolicy: Delete\n")
    wait_for(lambda: ready(stack, ns, "keeper") and ready(stack, ns, "dropper"), 60)
    stack.kubectl("delete", "tdb", "keeper", "dropper", "-n", ns, "--wait=true", "--timeout=60s")
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (keep,)).fetchone() == (False,)
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (keep,)).fetchone() == (1,)
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (drop,)).fetchone() is None
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (drop,)).fetchone() is None
