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


def events_seen(stack: Stack, namespace: str, name: str, reason: str, count: int, timeout: float = 30) -> list[str]:
    """The messages of the first ``count`` Events of ``reason`` about a TenantDatabase, read from a
    watch on the apiserver (``kubectl get events --watch``), not by polling."""
    proc = subprocess.Popen(
        [stack.env["DYNABASE_KUBECTL"], "get", "events", "-n", namespace, "--watch", "-o",
         "jsonpath={.message}{'\\n'}", f"--request-timeout={int(timeout)}s",
         f"--field-selector=involvedObject.kind=TenantDatabase,involvedObject.name={name},reason={reason}"],
        env={**os.environ, "KUBECONFIG": stack.env["KUBECONFIG"]}, stdout=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                messages.append(line.strip())
            if len(messages) >= count:
                break
    finally:
        proc.kill()
        proc.wait()
    return messages


def kube_wait(stack: Stack, namespace: str, what: str, *names: str, timeout: int = 60) -> None:
    """`kubectl wait` (a watch on the apiserver) for each TenantDatabase: ``what`` is a condition
    (``condition=Ready``) or a JSONPath (``jsonpath={.status.appliedTier}=PRO``)."""
    for name in names:
        done = stack.kubectl("wait", f"tdb/{name}", "-n", namespace, f"--for={what}", f"--timeout={timeout}s",
                             check=False)
        if done.returncode != 0:
            status = json.dumps(get(stack, namespace, name).get("status"), indent=1)
            raise AssertionError(f"{name}: no {what} within {timeout}s ({done.stderr.strip()}); status: {status}")


def settled(stack: Stack, namespace: str, *names: str) -> None:
    """Ready, and kopf done with the event: it records the handled spec as the handlers' last write."""
    kube_wait(stack, namespace, "condition=Ready", *names)
    kube_wait(stack, namespace, "jsonpath={.metadata.annotations.dynabase\\.io/last-handled-configuration}", *names)


def postgres_reaches(stack: Stack, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Postgres sends no notification when a catalog row changes: its state is read until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"Postgres did not reach {what} within {timeout}s")
        time.sleep(0.1)


def rolconnlimit(stack: Stack, role: str) -> int | None:
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        row = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row[0] if row else None


def drift(stack: Stack, role: str, limit: int) -> None:
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"], autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {quote_ident(role)} CONNECTION LIMIT {int(limit)}")


def apply_tenant(stack: Stack, namespace: str, name: str, spec: str) -> None:
    stack.kubectl("apply", "-f", "-", input=tenant(name, spec, namespace))


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
    kube_wait(stack, ns, "condition=Ready", *expected)
    for name, limit in expected.items():
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


def test_tier_patch_goes_live(operator: Operator) -> None:
    """The limit is live once the status says the tier is applied (how fast: `python -m bench.operator`)."""
    stack, ns = operator.stack, operator.namespace
    db = f"up_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "upgrader", f"orgId: o\ntier: FREE\ndatabaseName: {db}\n")
    kube_wait(stack, ns, "jsonpath={.status.appliedTier}=FREE", "upgrader")
    assert rolconnlimit(stack, db) == 5
    stack.kubectl("patch", "tdb", "upgrader", "-n", ns, "--type=merge", "-p", '{"spec":{"tier":"PRO"}}')
    kube_wait(stack, ns, "jsonpath={.status.appliedTier}=PRO", "upgrader")
    assert rolconnlimit(stack, db) == 50
    obj = get(stack, ns, "upgrader")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert [h["to"] for h in obj["status"]["history"]] == ["FREE", "PRO"]


def test_downgrade_waits_then_applies(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    policy = (ROOT / "examples" / "tierpolicy-default.yaml").read_text()
    policy = policy.replace("name: default", "name: quick")
    policy = policy.replace("downgradeGracePeriod: 15m", "downgradeGracePeriod: 4s")
    stack.kubectl("apply", "-f", "-", input=policy)
    db = f"down_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "downgrader", f"orgId: o\ntier: PRO\ntierPolicyRef: quick\ndatabaseName: {db}\n")
    kube_wait(stack, ns, "jsonpath={.status.appliedTier}=PRO", "downgrader")
    assert rolconnlimit(stack, db) == 50
    stack.kubectl("patch", "tdb", "downgrader", "-n", ns, "--type=merge", "-p", '{"spec":{"tier":"FREE"}}')
    kube_wait(stack, ns, "jsonpath={.status.pendingTier}=FREE", "downgrader", timeout=20)
    status = get(stack, ns, "downgrader")["status"]  # read within the 4 s of grace: the old limit holds
    assert status["appliedTier"] == "PRO" and status["effectiveAt"] and rolconnlimit(stack, db) == 50
    header, row = stack.kubectl("get", "tdb", "downgrader", "-n", ns, "-o", "wide").stdout.splitlines()[:2]
    assert header.split()[2:5] == ["TIER", "APPLIED", "PENDING"] and row.split()[2:5] == ["FREE", "PRO", "FREE"]
    # The drift loop applies it once the grace period is over.
    kube_wait(stack, ns, "jsonpath={.status.appliedTier}=FREE", "downgrader", timeout=30)
    final = get(stack, ns, "downgrader")["status"]
    assert not final.get("pendingTier") and rolconnlimit(stack, db) == 5
    assert [h["to"] for h in final["history"]] == ["PRO", "FREE"]
    # The drift pass that applied it posted its Event too (drift passes run outside kopf's handlers).
    applied = events_seen(stack, ns, "downgrader", "TierApplied", 2)
    assert sorted(applied) == ["tier FREE applied (was PRO)", "tier PRO applied (was none)"], applied


def test_missing_tier_is_a_condition_and_others_are_unaffected(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db_bad, db_good = f"bad_{uuid.uuid4().hex[:6]}", f"good_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "no-such-tier", f"orgId: o\ntier: PLATINUM\ndatabaseName: {db_bad}\n")
    apply_tenant(stack, ns, "neighbour", f"orgId: o\ntier: STARTER\ndatabaseName: {db_good}\n")
    kube_wait(stack, ns, "condition=Ready", "neighbour")
    kube_wait(stack, ns, "condition=Ready=False", "no-such-tier", timeout=30)
    bad = condition(get(stack, ns, "no-such-tier"), "Ready")
    assert bad["status"] == "False" and bad["reason"] == "TierNotFound"
    assert "PLATINUM" in bad["message"] and "FREE" in bad["message"]
    assert rolconnlimit(stack, db_bad) is None
    assert rolconnlimit(stack, db_good) == 10


def test_manual_drift_is_reverted_by_the_drift_loop(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    db = f"drift_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "drifter", f"orgId: o\ntier: FREE\ndatabaseName: {db}\n")
    settled(stack, ns, "drifter")
    generation = get(stack, ns, "drifter")["metadata"]["generation"]
    drift(stack, db, 999)
    # No event reaches the operator: only its drift loop (every DRIFT_INTERVAL) can find this.
    postgres_reaches(stack, lambda: rolconnlimit(stack, db) == 5, f"CONNECTION LIMIT 5 for {db} again",
                     timeout=DRIFT_INTERVAL * 2 + 30)
    assert get(stack, ns, "drifter")["metadata"]["generation"] == generation


def test_steady_state_makes_no_api_writes(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    calm, pacer = f"calm_{uuid.uuid4().hex[:6]}", f"pacer_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "calm", f"orgId: o\ntier: PRO\ndatabaseName: {calm}\n")
    apply_tenant(stack, ns, "pacer", f"orgId: o\ntier: FREE\ndatabaseName: {pacer}\n")
    settled(stack, ns, "calm", "pacer")
    version = get(stack, ns, "calm")["metadata"]["resourceVersion"]
    # Each drift pass covers every tenant: a pass that reverts a change to the pacer made after the
    # previous one was reverted began after it, so the second revert proves a whole pass over calm.
    for _ in range(2):
        drift(stack, pacer, 999)
        postgres_reaches(stack, lambda: rolconnlimit(stack, pacer) == 5, "the pacer reverted by a drift pass",
                         timeout=DRIFT_INTERVAL * 2 + 30)
    assert get(stack, ns, "calm")["metadata"]["resourceVersion"] == version


def test_operator_killed_while_handling_converges_after_restart(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    names = [f"k{i}-{uuid.uuid4().hex[:4]}" for i in range(5)]
    for name in names:
        apply_tenant(stack, ns, name, f"orgId: o\ntier: STARTER\ndatabaseName: {name.replace('-', '_')}\n")
    # Killed once it has begun handling them (its first write: kopf's finalizer).
    kube_wait(stack, ns, "jsonpath={.metadata.finalizers[0]}=dynabase.io/finalizer", names[0])
    operator.stop(signal.SIGKILL)
    operator.start()
    kube_wait(stack, ns, "condition=Ready", *names, timeout=90)
    for name in names:
        assert rolconnlimit(stack, name.replace("-", "_")) == 10
        history = get(stack, ns, name).get("status", {}).get("history", [])
        assert [h["to"] for h in history] == ["STARTER"]  # applied once, not twice


def test_delete_with_retain_and_with_delete(operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    keep, drop = f"keep_{uuid.uuid4().hex[:6]}", f"drop_{uuid.uuid4().hex[:6]}"
    apply_tenant(stack, ns, "keeper", f"orgId: o\ntier: FREE\ndatabaseName: {keep}\n")
    apply_tenant(stack, ns, "dropper", f"orgId: o\ntier: FREE\ndatabaseName: {drop}\ndeletionPolicy: Delete\n")
    kube_wait(stack, ns, "condition=Ready", "keeper", "dropper")
    stack.kubectl("delete", "tdb", "keeper", "dropper", "-n", ns, "--wait=true", "--timeout=60s")
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (keep,)).fetchone() == (False,)
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (keep,)).fetchone() == (1,)
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (drop,)).fetchone() is None
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (drop,)).fetchone() is None
