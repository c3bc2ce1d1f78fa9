"""Shared fixtures: one real devstack per test session.

The stack is started once (Postgres, PgBouncer, Redis, etcd + kube-apiserver,
FerretDB) in a temp dir on free loopback ports and torn down at the end. Where
a Go-built binary is unavailable, only the tests that need it are skipped, with
the reason; everything else still runs against real servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynabase.devstack import binaries
from dynabase.devstack.stack import ALL_SERVICES, Devstack

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    devstack: Devstack
    env: dict[str, str]
    missing: dict[str, str]

    def need(self, *services: str) -> None:
        for service in services:
            if service in self.missing:
                pytest.skip(f"{service} unavailable here: {self.missing[service]}")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        self.need("kube-apiserver")
        return subprocess.run(
            [self.env["DYNABASE_KUBECTL"], *args],
            env={**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]},
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=60,
        )


def _unavailable() -> dict[str, str]:
    missing: dict[str, str] = {}
    build = os.environ.get("DYNABASE_BUILD_BINARIES", "0") == "1"
    for service, binary in (("etcd", binaries.ETCD), ("kube-apiserver", binaries.KUBE_APISERVER),
                            ("ferretdb", binaries.FERRETDB)):
        try:
            binaries.ensure(binary, build=build)
        except binaries.BinaryUnavailable as exc:
            missing[service] = str(exc)
    if "etcd" in missing:
        missing.setdefault("kube-apiserver", "needs etcd")
    return missing


def _existing_cluster() -> dict[str, str] | None:
    """envtest's convention: USE_EXISTING_CLUSTER=true means use KUBECONFIG's cluster."""
    if os.environ.get("USE_EXISTING_CLUSTER", "").lower() != "true":
        return None
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    found = binaries.find(binaries.KUBECTL)
    kubectl = str(found) if found else shutil.which("kubectl")
    if not kubectl:
        raise RuntimeError("USE_EXISTING_CLUSTER=true needs kubectl on PATH or TEST_ASSET_KUBECTL")
    return {"KUBECONFIG": kubeconfig, "DYNABASE_KUBECTL": kubectl}


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    existing = _existing_cluster()
    missing = _unavailable()
    if existing is not None:
        missing.pop("etcd", None)
        missing.pop("kube-apiserver", None)
    skip = set(missing) | ({"etcd", "kube-apiserver"} if existing else set())
    # Not pytest's tmp_path: its 0700 parents keep the postgres user out when run as root.
    root = Path(tempfile.mkdtemp(prefix="dynabase-test-"))
    devstack = Devstack(root)
    try:
        devstack.up([s for s in ALL_SERVICES if s not in skip], build=False)
        yield Stack(devstack, {**devstack.env(), **(existing or {})}, missing)
    finally:
        devstack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def crds_applied(stack: Stack) -> None:
    stack.kubectl("apply", "-k", str(ROOT / "crds"))
    for crd in ("tenantdatabases.dynabase.io", "tierpolicies.dynabase.io"):
        stack.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
