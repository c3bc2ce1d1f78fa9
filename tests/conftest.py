"""Shared fixtures: one real devstack per test session.

The stack is started once (Postgres, PgBouncer, Redis, etcd + kube-apiserver,
FerretDB) in a temp dir on free loopback ports and torn down at the end. Where
a Go-built binary is unavailable, only the tests that need it are skipped, with
the reason; everything else still runs against real servers.

With ``CI=true`` such a skip is a failure instead: CI that stays green while the
tests of a missing server silently skip would prove nothing about them. A test
that needs the kube-apiserver or FerretDB carries the ``kube`` or ``mongo``
marker (``-m "not kube"`` leaves them out); ``Stack.need`` fails a test that
asks for a server without carrying its marker.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from dynabase.devstack import binaries
from dynabase.devstack.stack import ALL_SERVICES, Devstack

ROOT = Path(__file__).resolve().parent.parent
# The marker a test needing this server carries.
SERVICE_MARKERS = {"etcd": "kube", "kube-apiserver": "kube", "ferretdb": "mongo"}
MARKER_SERVICES = {"kube": "kube-apiserver", "mongo": "ferretdb"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_server(reason: str) -> NoReturn:
    """A test that cannot run for want of a real server: a skip on a developer's machine, a failure in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing server fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason)


# The test being set up or run; None during teardown, when session and module fixtures end.
_current: list[pytest.Item] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _current[:] = [item]
    for marker, service in MARKER_SERVICES.items():
        if item.get_closest_marker(marker) is not None and service in unavailable_servers():
            missing_server(f"{service} unavailable here: {unavailable_servers()[service]}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _current.clear()


@dataclass
class Stack:
    devstack: Devstack
    env: dict[str, str]
    missing: dict[str, str]

    def need(self, *services: str) -> None:
        for service in services:
            marker = SERVICE_MARKERS.get(service)
            if marker and _current and _current[0].get_closest_marker(marker) is None:
                pytest.fail(f"{_current[0].nodeid} needs {service} but is not marked @pytest.mark.{marker}; "
                            f"mark it, so that -m 'not {marker}' leaves it out", pytrace=False)
            if service in self.missing:
                missing_server(f"{service} unavailable here: {self.missing[service]}")

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


@functools.cache
def unavailable_servers() -> dict[str, str]:
    """Servers this session cannot run, with the reason (found once, without building anything)."""
    missing: dict[str, str] = {}
    build = os.environ.get("DYNABASE_BUILD_BINARIES", "0") == "1"
    for service, binary in (("etcd", binaries.ETCD), ("kube-apiserver", binaries.KUBE_APISERVER),
                            ("kubectl", binaries.KUBECTL), ("ferretdb", binaries.FERRETDB)):
        try:
            binaries.ensure(binary, build=build)
        except binaries.BinaryUnavailable as exc:
            missing[service] = str(exc)
    if "kubectl" in missing:
        missing.setdefault("kube-apiserver", f"needs kubectl: {missing['kubectl']}")
    if "etcd" in missing:
        missing.setdefault("kube-apiserver", "needs etcd")
    missing.pop("kubectl", None)
    if _existing_cluster() is not None:
        missing.pop("etcd", None)
        missing.pop("kube-apiserver", None)
    return missing


@functools.cache
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
    missing = unavailable_servers()
    skip = set(missing) | ({"etcd", "kube-apiserver"} if existing else set())
    # Not pytest's tmp_path: its 0700 parents keep the postgres user out when run as root.
    root = Path(tempfile.mkdtemp(prefix="dynabase-test-"))
    devstack = Devstack(root)
    try:
        devstack.up([s for s in ALL_SERVICES if s not in skip], build=False)
        yield Stack(devstack, {**devstack.env(), **(existing or {})}, dict(missing))
    finally:
        devstack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def crds_applied(stack: Stack) -> None:
    stack.kubectl("apply", "-k", str(ROOT / "crds"))
    for crd in ("tenantdatabases.dynabase.io", "tierpolicies.dynabase.io"):
        stack.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
