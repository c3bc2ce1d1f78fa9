"""Operators sharded by label, as real `dynabase operator` processes against the devstack's
apiserver: every tenant is reconciled by exactly one shard, and a standby replica takes
over its shard when the active one dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dynabase.kube.shards import SHARD_LABEL, Shard, shard_of

from .conftest import ROOT, Stack
from .manifests import tenant

PEERING = "dynabase-test"  # the operators below are marked kube; the layout test needs only Redis
LIFETIME = 6  # seconds a killed active replica is trusted: the standby waits this long at most


class ShardOperator:
    def __init__(self, stack: Stack, namespace: str, shard: str, name: str) -> None:
        self.stack, self.namespace, self.shard = stack, namespace, shard
        self.log = stack.devstack.root / "logs" / f"operator-{namespace}-{name}.log"
        env = {**os.environ, **stack.env, "DYNABASE_LOG_LEVEL": "INFO"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dynabase.cli", "operator", "--namespace", namespace, "--shard", shard,
                 "--peering", PEERING, "--peering-lifetime", str(LIFETIME), "--drift-interval", "30",
                 "--metrics-port", "0", "--liveness-port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(stack: Stack, crds_applied: None) -> Iterator[tuple[Stack, str, list[ShardOperator]]]:
    stack.kubectl("apply", "-f", str(ROOT / "manifests" / "peering.yaml"))
    for crd in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        stack.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    namespace = f"shard-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    operators: list[ShardOperator] = []
    try:
        yield stack, namespace, operators
    finally:
        for op in operators:
            op.stop()


def apply_tenants(stack: Stack, namespace: str, names: list[str], labels: dict[str, str] | None = None) -> None:
    docs = []
    for name in names:
        doc = tenant(name, f"orgId: org-{name}\ntier: FREE\n", namespace)
        if labels and name in labels:
            doc = doc.replace(f"  namespace: {namespace}\n",
                              f"  namespace: {namespace}\n  labels: {{{SHARD_LABEL}: '{labels[name]}'}}\n", 1)
        docs.append(doc)
    stack.kubectl("apply", "-f", "-", input="---\n".join(docs))


def wait_ready(stack: Stack, namespace: str, names: list[str], timeout: int = 120) -> None:
    for name in names:
        done = stack.kubectl("wait", f"tdb/{name}", "-n", namespace, "--for=condition=Ready", f"--timeout={timeout}s",
                             check=False)
        assert done.returncode == 0, f"{name} not Ready: {done.stderr}"


def tenants(stack: Stack, namespace: str) -> dict[str, dict[str, Any]]:
    out = stack.kubectl("get", "tdb", "-n", namespace, "-o", "json", "--show-managed-fields")
    return {item["metadata"]["name"]: item for item in json.loads(out.stdout)["items"]}


def peers(stack: Stack, namespace: str, shard: int) -> dict[str, Any]:
    """The live replicas in a shard's peering object (kopf's keep-alives)."""
    out = stack.kubectl("get", "kopfpeering", f"{PEERING}-shard-{shard}", "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}


def status_writers(obj: dict[str, Any]) -> set[str]:
    """The operators (field managers) that wrote this tenant's status."""
    return {entry["manager"] for entry in obj["metadata"].get("managedFields", [])
            if entry.get("subresource") == "status" and entry["manager"].startswith("dynabase-operator")}


def test_shard_parsing_and_the_derived_shard_are_stable() -> None:
    assert Shard.parse("1/3") == Shard(1, 3) and Shard.parse("1/3").selector == f"{SHARD_LABEL}=1"
    assert Shard.parse("0/2").unassigned == f"{SHARD_LABEL} notin (0,1)"
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
    # Every operator, in every process and version, derives the same shard (not Python's salted hash):
    # the first 8 bytes of sha256("team-a/acme") are 0x9201d5e7e01adea9.
    assert (shard_of("team-a", "acme", 2), shard_of("team-a", "acme", 7), shard_of("default", "globex", 3)) == (1, 6, 0)
    assert {shard_of("ns", f"t{i}", 4) for i in range(64)} == {0, 1, 2, 3}


@pytest.mark.kube
def test_two_shards_reconcile_every_tenant_exactly_once(cluster: tuple[Stack, str, list[ShardOperator]]) -> None:
    stack, namespace, operators = cluster
    operators += [ShardOperator(stack, namespace, "0/2", "a"), ShardOperator(stack, namespace, "1/2", "b")]
    prefix = namespace.replace("shard-", "s")
    names = [f"{prefix}-{i}" for i in range(16)]
    # Most without a label (the operators label them), one with a shard of its own choosing
    # against its hash, one with a label that names no shard of 2.
    chosen, stray = names[0], names[1]
    chosen_shard = str(1 - shard_of(namespace, chosen, 2))
    apply_tenants(stack, namespace, names, {chosen: chosen_shard, stray: "7"})
    wait_ready(stack, namespace, names)
    objects = tenants(stack, namespace)
    by_shard: dict[str, list[str]] = {"0": [], "1": []}
    for name in names:
        label = objects[name]["metadata"]["labels"][SHARD_LABEL]
        expected = chosen_shard if name == chosen else str(shard_of(namespace, name, 2))
        assert label == expected, name
        # Exactly one writer, and it is the shard of the label: no overlap, no gap.
        assert status_writers(objects[name]) == {f"dynabase-operator-shard-{label}-of-2"}, name
        by_shard[label].append(name)
    assert by_shard["0"] and by_shard["1"]
    peerings = stack.kubectl("get", "kopfpeerings", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(peerings) == [f"kopfpeering.kopf.dev/{PEERING}-shard-0", f"kopfpeering.kopf.dev/{PEERING}-shard-1"]


@pytest.mark.kube
def test_a_standby_takes_over_its_shard_when_the_active_one_dies(
        cluster: tuple[Stack, str, list[ShardOperator]]) -> None:
    stack, namespace, operators = cluster
    prefix = namespace.replace("shard-", "s")
    names = [f"{prefix}-{i}" for i in range(40)]
    zero = [n for n in names if shard_of(namespace, n, 2) == 0]
    one = [n for n in names if shard_of(namespace, n, 2) == 1]
    active = ShardOperator(stack, namespace, "0/2", "active")
    operators.append(active)
    apply_tenants(stack, namespace, zero[:1])
    wait_ready(stack, namespace, zero[:1])  # the first replica of shard 0 is up and acting
    standby = ShardOperator(stack, namespace, "0/2", "standby")
    operators += [standby, ShardOperator(stack, namespace, "1/2", "other")]
    deadline = time.monotonic() + 60
    while len(peers(stack, namespace, 0)) < 2:  # the standby has joined shard 0's peering (kopf starts paused)
        assert time.monotonic() < deadline, standby.text()[-3000:]
        time.sleep(0.2)
    assert "Resuming operations" in active.text() and "Resuming operations" not in standby.text()
    apply_tenants(stack, namespace, [zero[1], one[0]])
    wait_ready(stack, namespace, [zero[1], one[0]])
    assert "tenant_changed" not in standby.text()  # kopf logs each handler run: none while it stood by

    active.stop(signal.SIGKILL)  # a crash: no goodbye in the peering object, its entry must expire
    apply_tenants(stack, namespace, [zero[2], zero[3]])
    wait_ready(stack, namespace, [zero[2], zero[3]], timeout=LIFETIME * 10)
    assert "tenant_changed" in standby.text()  # the standby did it: the only live replica of shard 0
    objects = tenants(stack, namespace)
    for name in (zero[2], zero[3]):
        assert status_writers(objects[name]) == {"dynabase-operator-shard-0-of-2"}
    assert status_writers(objects[one[0]]) == {"dynabase-operator-shard-1-of-2"}


async def test_two_engines_patching_the_shared_pgbouncer_layout_lose_no_route(stack: Stack) -> None:
    """Shards each patch their tenants into the one layout; A reads it, B publishes, A publishes."""
    import asyncio
    import contextlib
    from collections.abc import AsyncIterator

    from dynabase.backends.pgbouncer import PgBouncerBackend
    from dynabase.engine.runtime import close_engine

    from .engine_helpers import example_policy, make_engine, make_tenant, unique

    engines = [await make_engine(stack.env["DYNABASE_POSTGRES_DSN"]) for _ in range(2)]
    a, b = (engine for engine, _, _ in engines)
    a.pgbouncer, b.pgbouncer = (PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"]) for _ in range(2))
    a_read, go, b_wants = asyncio.Event(), asyncio.Event(), asyncio.Event()
    a_observe, b_lock = a.pgbouncer.observe, b.pgbouncer.layout_lock

    async def a_observes_then_waits() -> Any:
        observed = await a_observe()
        a_read.set()
        await go.wait()
        return observed

    @contextlib.asynccontextmanager
    async def b_asks() -> AsyncIterator[None]:
        b_wants.set()
        async with b_lock():
            yield

    a.pgbouncer.observe = a_observes_then_waits  # type: ignore[method-assign]
    b.pgbouncer.layout_lock = b_asks  # type: ignore[method-assign]
    policies = {"default": example_policy()}
    ta, tb = make_tenant(unique("la"), "FREE"), make_tenant(unique("lb"), "FREE")
    try:
        first = asyncio.create_task(a.reconcile_all(policies, [ta]))
        await asyncio.wait_for(a_read.wait(), 60)
        second = asyncio.create_task(b.reconcile_all(policies, [tb]))
        await asyncio.wait_for(b_wants.wait(), 60)
        await asyncio.sleep(0.5)  # room for B to publish over A's read, were it not held back
        go.set()
        results = await asyncio.gather(first, second)
        assert all(r.tenants[0].ready for r in results), [r.tenants[0].outcomes for r in results]
        routes = (await a_observe()).published
        assert routes is not None and {ta.database_name, tb.database_name} <= set(routes.routes)
    finally:
        for engine, _, _ in engines:
            await close_engine(engine)
            assert engine.pgbouncer is not None
            await engine.pgbouncer.close()


@pytest.mark.kube
def test_the_sharded_operator_overlay_replaces_the_single_operator(stack: Stack, crds_applied: None) -> None:
    import yaml

    rendered = stack.kubectl("kustomize", str(ROOT / "examples" / "sharded-operator")).stdout
    deployments = {d["metadata"]["name"]: d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"}
    assert "dynabase-operator" not in deployments  # an unsharded operator beside them would take every tenant
    for n in (0, 1):
        pod = deployments[f"dynabase-operator-shard-{n}"]["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert args[args.index("--shard") + 1] == f"{n}/2" and "--peering" in args
        assert pod["containers"][0]["image"].startswith("ghcr.io/")
    stack.kubectl("create", "namespace", "dynabase-system", check=False)  # a dry run creates no namespace first
    stack.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "examples" / "sharded-operator"))


@pytest.mark.kube
async def test_an_operator_pass_reads_generated_passwords_in_bulk(stack: Stack, crds_applied: None) -> None:
    """A drift round over a shard's tenants reads their Secrets with a LIST, not a GET each."""
    from dynabase.engine.passwords import load_passwords
    from dynabase.engine.results import TenantResult
    from dynabase.kube.stores import KubeSecretStore
    from dynabase.kubeapi import KubeApi

    from .engine_helpers import make_tenant

    stack.need("kube-apiserver")
    namespace = f"bulk-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    os.environ["KUBECONFIG"] = stack.env["KUBECONFIG"]
    calls: list[str] = []

    class Counted(KubeApi):
        async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json"
                          ) -> dict[str, Any]:
            calls.append(f"{method} {path.split('?')[0].rsplit('/', 1)[-1]}")
            return await super().request(method, path, body, content_type)

    def tenant_in(name: str) -> Any:
        raw = make_tenant(name.replace("-", "_"), "FREE").model_dump(by_alias=True, exclude_none=True, mode="json")
        raw["metadata"].update(name=name, namespace=namespace)
        from dynabase.spec import TenantDatabase
        return TenantDatabase.model_validate(raw)

    async with Counted() as api:
        store = KubeSecretStore(api)
        generated = [tenant_in(f"gen-{i}") for i in range(3)]
        for i, tenant in enumerate(generated):
            await store.create_password(tenant, f"pw-{i}")
        restored = tenant_in("restored")  # given back by hand, as the SecretMissing hint says: no label
        stack.kubectl("create", "secret", "generic", "restored-dynabase-password", "-n", namespace,
                      "--from-literal=password=pw-restored")
        calls.clear()
        results = [TenantResult(t) for t in [*generated, restored]]
        await load_passwords(store, results)
    assert [r.password.reveal() if r.password else None for r in results] == ["pw-0", "pw-1", "pw-2", "pw-restored"]
    assert sorted(calls) == ["GET restored-dynabase-password", "GET secrets"]  # one LIST, one GET
