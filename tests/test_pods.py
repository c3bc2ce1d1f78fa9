"""manifests/ on a real kubelet: the operator, proxy and agent pods from dynabase:dev, Ready.

devstack/node.py adds containerd, kubelet, kube-controller-manager and kube-scheduler to the
session's apiserver. The base manifests are applied unchanged through an overlay, as a user
would: the image, the backends' Secret, and what the host network asks for. Pods use the host
network because the devstack's servers listen on loopback; with no kube-proxy on the node, the
operator is pointed at the apiserver's own address (KUBERNETES_SERVICE_HOST/PORT), and every
port comes from this machine's free ones.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dynabase.devstack import node as devstack_node
from dynabase.devstack.stack import free_port

from .conftest import ROOT, Stack, missing_server
from .manifests import tenant
from .test_image import IMAGE, image_unavailable, redis_url

NAMESPACE = "dynabase-system"  # the base manifests' namespace
POSTGRES_SOCKET = "/run/postgresql"  # where the agent's pod sees the devstack's Postgres socket


@dataclass
class Cluster:
    stack: Stack
    node: devstack_node.Node
    proxy_port: int

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> Any:
        return self.node.kubectl(*args, check=check, input=input, timeout=300)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def pods(self, app: str) -> list[dict[str, Any]]:
        return list(self.json("get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={app}")["items"])

    def logs(self, app: str) -> str:
        return str(self.kubectl("logs", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={app}", "--all-containers",
                                "--tail=40", check=False).stdout)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 180,
             details: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f}s\n{details()}")


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) \
        and pod["metadata"].get("deletionTimestamp") is None


def base_containers(file: str, deployment: str) -> list[dict[str, Any]]:
    for doc in yaml.safe_load_all((ROOT / "manifests" / file).read_text()):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == deployment:
            return list(doc["spec"]["template"]["spec"]["containers"])
    raise AssertionError(f"no Deployment {deployment} in manifests/{file}")


def overlay(stack: Stack, directory: Path, *, apiserver_port: int, proxy_port: int) -> Path:
    """A kustomization over ../manifests as a user writes one; the host network's changes as patches."""
    env = stack.env
    pg = stack.devstack.state.services["postgres"]
    directory.mkdir()
    backends = {
        "DYNABASE_POSTGRES_DSN": env["DYNABASE_POSTGRES_DSN"],
        "DYNABASE_REDIS_URL": redis_url(stack, 4),  # the pods' own layout, apart from other tests'
        "DYNABASE_PGBOUNCER_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "DYNABASE_PGBOUNCER_UPSTREAM_HOST": POSTGRES_SOCKET,
        "DYNABASE_PGBOUNCER_UPSTREAM_PORT": str(pg.port),
    }
    (directory / "backends.env").write_text("".join(f"{k}={v}\n" for k, v in backends.items()))
    (directory / "backends.env").chmod(0o600)

    def env_list(values: dict[str, str]) -> list[dict[str, str]]:
        return [{"name": k, "value": v} for k, v in values.items()]

    def ports(*named: tuple[str, int]) -> list[dict[str, Any]]:
        return [{"name": name, "containerPort": port} for name, port in named]

    proxy_containers = base_containers("proxy.yaml", "dynabase-proxy")

    def set_env(container: int, name: str, value: str) -> dict[str, Any]:
        names = [e["name"] for e in proxy_containers[container]["env"]]
        return {"op": "replace", "path": f"/spec/template/spec/containers/{container}/env/{names.index(name)}",
                "value": {"name": name, "value": value}}

    operator_health, operator_metrics = free_port(), free_port()
    agent_base, proxy_metrics = free_port(), free_port()
    patches = [
        ("dynabase-operator", [
            {"op": "replace", "path": "/spec/replicas", "value": 1},  # one host, one health port
            {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
            {"op": "add", "path": "/spec/template/spec/dnsPolicy", "value": "ClusterFirstWithHostNet"},
            {"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"},
            {"op": "add", "path": "/spec/template/spec/containers/0/env", "value": env_list({
                "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(apiserver_port),
                "DYNABASE_LIVENESS_PORT": str(operator_health), "DYNABASE_METRICS_PORT": str(operator_metrics),
            })},
            {"op": "replace", "path": "/spec/template/spec/containers/0/ports",
             "value": ports(("metrics", operator_metrics), ("health", operator_health))},
        ]),
        ("dynabase-proxy", [
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
            {"op": "add", "path": "/spec/template/spec/dnsPolicy", "value": "ClusterFirstWithHostNet"},
            {"op": "add", "path": "/spec/template/spec/volumes/-",
             "value": {"name": "postgres-socket", "hostPath": {
                 "path": pg.extra["socket_dir"], "type": "Directory"}}},
            *[{"op": "add", "path": f"/spec/template/spec/containers/{i}/imagePullPolicy", "value": "Never"}
              for i in (0, 1)],
            set_env(0, "DYNABASE_PROXY_LISTEN", f"0.0.0.0:{proxy_port}"),
            set_env(0, "DYNABASE_PROXY_METRICS_PORT", str(proxy_metrics)),
            {"op": "replace", "path": "/spec/template/spec/containers/0/ports",
             "value": ports(("postgres", proxy_port), ("metrics", proxy_metrics))},
            set_env(1, "DYNABASE_PGBOUNCER_BASE_PORT", str(agent_base)),
            {"op": "replace", "path": "/spec/template/spec/containers/1/ports",
             "value": ports(("pgbouncer", agent_base))},
            {"op": "add", "path": "/spec/template/spec/containers/1/volumeMounts/-",
             "value": {"name": "postgres-socket", "mountPath": POSTGRES_SOCKET}},
        ]),
    ]
    name, tag = IMAGE.rsplit(":", 1)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [os.path.relpath(ROOT / "manifests", directory)],  # kustomize wants it relative
        "images": [{"name": "ghcr.io/dynabase/dynabase", "newName": name, "newTag": tag}],
        "secretGenerator": [{"name": "dynabase-backends", "envs": ["backends.env"],
                             "options": {"disableNameSuffixHash": True}}],
        "patches": [{"target": {"kind": "Deployment", "name": deployment}, "patch": yaml.safe_dump(ops)}
                    for deployment, ops in patches],
    }, sort_keys=False))
    return directory


@pytest.fixture(scope="module")
def cluster(stack: Stack, crds_applied: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stack.need("postgres", "redis", "kube-apiserver")
    if os.environ.get("USE_EXISTING_CLUSTER", "").lower() == "true":
        pytest.skip("pods on a real kubelet: with USE_EXISTING_CLUSTER=true the pods would run on that cluster's "
                    "nodes, where the devstack's loopback servers are out of reach")
    reason = image_unavailable() or devstack_node.unavailable()
    if reason:
        missing_server(f"pods on a real kubelet: {reason}")
    node = devstack_node.Node(stack.devstack)
    proxy_port = free_port()
    kustomization = overlay(stack, tmp_path_factory.mktemp("overlay") / "devstack",
                            apiserver_port=node.apiserver_port, proxy_port=proxy_port)
    result = Cluster(stack, node, proxy_port)
    started = time.monotonic()
    try:
        # The README's commands, with this overlay; applied before the node runs, so no pod ever
        # starts from another template (test_manifests.py applies the plain manifests earlier).
        result.kubectl("apply", "-k", str(kustomization))
        result.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
        result.kubectl("apply", "-f", str(ROOT / "manifests" / "peering"))
        result.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
        node.up()
        node.load_image(IMAGE)
        for deployment in ("dynabase-operator", "dynabase-proxy"):
            rollout = result.kubectl("rollout", "status", f"deployment/{deployment}", "-n", NAMESPACE,
                                     "--timeout=240s", check=False)
            assert rollout.returncode == 0, f"{deployment}: {rollout.stderr}\n{result.logs(deployment)}"
        print(f"[test_pods] operator and proxy pods Ready {time.monotonic() - started:.1f}s after apply")
        yield result
    finally:
        # Pods go before the node, so the kubelet stops them (their shims are the node's to clean up too).
        result.kubectl("delete", "deployment", "--all", "-n", NAMESPACE, "--wait=false", check=False)
        with_pods = lambda: bool(result.json("get", "pods", "-n", NAMESPACE)["items"])  # noqa: E731
        deadline = time.monotonic() + 60
        while node.services and with_pods() and time.monotonic() < deadline:
            time.sleep(0.5)
        node.down()


@pytest.mark.kube
def test_operator_proxy_and_agent_pods_are_ready_as_the_manifests_declare(cluster: Cluster) -> None:
    (operator,) = cluster.pods("dynabase-operator")
    (proxy,) = cluster.pods("dynabase-proxy")
    assert pod_ready(operator) and pod_ready(proxy)
    statuses = {c["name"]: c for c in proxy["status"]["containerStatuses"]}
    assert set(statuses) == {"proxy", "pgbouncer-agent"} and all(c["ready"] for c in statuses.values())
    for pod in (operator, proxy):
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
        assert pod["status"]["qosClass"] == "Burstable"  # requests below limits, as declared
        assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in pod["spec"]["containers"])
    assert operator["spec"]["serviceAccountName"] == "dynabase-operator"
    # The kubelet put the declared memory limit on the proxy container's cgroup.
    container_id = statuses["proxy"]["containerID"].split("://", 1)[1]
    limits = list(Path("/sys/fs/cgroup/memory").glob(f"kubepods/**/{container_id}/memory.limit_in_bytes"))
    assert limits and int(limits[0].read_text()) == 256 * 1024 * 1024


@pytest.mark.kube
def test_a_tenant_applied_with_kubectl_is_served_through_the_proxy_pod(cluster: Cluster) -> None:
    namespace = f"pods-{uuid.uuid4().hex[:6]}"
    db = f"pods_{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("apply", "-f", "-", input=tenant("shop", f"orgId: org-shop\ntier: PRO\ndatabaseName: {db}\n",
                                                     namespace))
    waited = cluster.kubectl("wait", "--for=condition=Ready", "tdb/shop", "-n", namespace, "--timeout=180s",
                             check=False)
    assert waited.returncode == 0, waited.stderr + cluster.logs("dynabase-operator")
    secret = cluster.json("get", "secret", "shop-dynabase-password", "-n", namespace)
    password = base64.b64decode(secret["data"]["password"]).decode()

    def query() -> bool:  # until the proxy's topology refresh has seen the agent's new pool
        try:
            with psycopg.connect(host="127.0.0.1", port=cluster.proxy_port, user=db, password=password,
                                 dbname=db, sslmode="disable", connect_timeout=5) as conn:
                return conn.execute("SELECT current_user").fetchone() == (db,)
        except psycopg.OperationalError as exc:
            assert "retry in a moment" in str(exc), exc
            return False

    wait_for("a query through the proxy pod", query, 60, lambda: cluster.logs("dynabase-proxy"))


@pytest.mark.kube
def test_a_deleted_operator_pod_is_replaced_and_the_replacement_converges(cluster: Cluster) -> None:
    namespace = f"pods-{uuid.uuid4().hex[:6]}"
    db = f"pods_{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    (before,) = cluster.pods("dynabase-operator")
    cluster.kubectl("delete", "pod", before["metadata"]["name"], "-n", NAMESPACE, "--wait=true")

    def replaced() -> bool:
        pods = [p for p in cluster.pods("dynabase-operator") if p["metadata"]["uid"] != before["metadata"]["uid"]]
        return len(pods) == 1 and pod_ready(pods[0])

    wait_for("a Ready replacement operator pod", replaced, 180, lambda: cluster.logs("dynabase-operator"))
    cluster.kubectl("apply", "-f", "-", input=tenant("late", f"orgId: org-late\ntier: FREE\ndatabaseName: {db}\n",
                                                     namespace))
    waited = cluster.kubectl("wait", "--for=condition=Ready", "tdb/late", "-n", namespace, "--timeout=180s",
                             check=False)
    assert waited.returncode == 0, waited.stderr + cluster.logs("dynabase-operator")
    cluster.kubectl("patch", "tdb", "late", "-n", namespace, "--type=merge", "-p", '{"spec":{"tier":"PRO"}}')

    def converged() -> bool:
        obj = cluster.json("get", "tdb", "late", "-n", namespace)
        status = obj.get("status", {})
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        return ready and status.get("observedGeneration") == obj["metadata"]["generation"]

    wait_for("the tier change applied by the replacement", converged, 180, lambda: cluster.logs("dynabase-operator"))
    with psycopg.connect(cluster.stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        row = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (db,)).fetchone()
    assert row == (50,)  # PRO's connectionLimit in examples/tierpolicy-default.yaml


def test_in_cluster_login_uses_the_address_the_kubelet_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynabase.kubeapi import in_cluster_server

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert in_cluster_server("https://kubernetes.default.svc") == "https://kubernetes.default.svc"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert in_cluster_server("https://kubernetes.default.svc") == "https://10.96.0.1:443"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert in_cluster_server("https://kubernetes.default.svc") == "https://[fd00::1]:443"
