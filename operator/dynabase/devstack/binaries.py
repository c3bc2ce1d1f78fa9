"""Locate or build the real server binaries the devstack and the tests run.

Lookup follows controller-runtime's envtest convention so a developer who
already has envtest assets reuses them: ``TEST_ASSET_<NAME>``, then
``$KUBEBUILDER_ASSETS/<name>``, then ``/usr/local/kubebuilder/bin/<name>``.
Otherwise the binary is built once with the ``go`` command from the Go module
proxy into a cache outside the checkout (CI clones afresh, the cache stays).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dynabase import settings

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
FERRETDB_VERSION = "v1.24.2"
STRIPE_MOCK_VERSION = "v0.203.0"


class BinaryUnavailable(RuntimeError):
    """A binary could not be found or built; the message says why."""


@dataclass(frozen=True)
class Binary:
    name: str
    version: str
    env_var: str


KUBE_APISERVER = Binary("kube-apiserver", KUBERNETES_VERSION, "TEST_ASSET_KUBE_APISERVER")
KUBECTL = Binary("kubectl", KUBERNETES_VERSION, "TEST_ASSET_KUBECTL")
ETCD = Binary("etcd", ETCD_VERSION, "TEST_ASSET_ETCD")
FERRETDB = Binary("ferretdb", FERRETDB_VERSION, "TEST_ASSET_FERRETDB")
# A single-node cluster from real parts (devstack/node.py): the pods' kubelet and the
# controllers and scheduler that Deployments and ServiceAccount tokens need.
KUBELET = Binary("kubelet", KUBERNETES_VERSION, "TEST_ASSET_KUBELET")
KUBE_CONTROLLER_MANAGER = Binary(
    "kube-controller-manager", KUBERNETES_VERSION, "TEST_ASSET_KUBE_CONTROLLER_MANAGER"
)
KUBE_SCHEDULER = Binary("kube-scheduler", KUBERNETES_VERSION, "TEST_ASSET_KUBE_SCHEDULER")
# The pod sandbox's process (registry.k8s.io/pause's job), from the Go file beside this
# module; its version is the source's digest, so an edit builds a new one.
PAUSE_SOURCE = Path(__file__).resolve().parent / "pause" / "main.go"
PAUSE = Binary(
    "pause",
    hashlib.sha256(PAUSE_SOURCE.read_bytes()).hexdigest()[:12] if PAUSE_SOURCE.exists() else "unknown",
    "TEST_ASSET_PAUSE",
)
CONTROL_PLANE_BINARIES = (KUBE_APISERVER, KUBECTL)
NODE_BINARIES = (KUBELET, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER)
# Stripe's API from its OpenAPI spec, validating every request (the billing close's tests).
STRIPE_MOCK = Binary("stripe-mock", STRIPE_MOCK_VERSION, "TEST_ASSET_STRIPE_MOCK")
ALL_BINARIES = (ETCD, KUBE_APISERVER, KUBECTL, FERRETDB, *NODE_BINARIES, PAUSE, STRIPE_MOCK)


def cache_dir() -> Path:
    return settings.cache_dir()


def cached_path(binary: Binary) -> Path:
    return cache_dir() / "bin" / f"{binary.name}-{binary.version}"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find(binary: Binary) -> Path | None:
    """Return an existing binary without building anything."""
    explicit = os.environ.get(binary.env_var)
    if explicit:
        return Path(explicit) if _is_executable(Path(explicit)) else None
    candidates = []
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        candidates.append(Path(assets) / binary.name)
    candidates.append(Path("/usr/local/kubebuilder/bin") / binary.name)
    candidates.append(cached_path(binary))
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    return None


def ensure(binary: Binary, *, build: bool = True) -> Path:
    found = find(binary)
    if found is not None:
        return found
    if os.environ.get(binary.env_var):
        raise BinaryUnavailable(
            f"{binary.env_var}={os.environ[binary.env_var]} is not an executable file"
        )
    if not build:
        raise BinaryUnavailable(
            f"{binary.name} {binary.version} not found; run `dynabase devstack build` "
            f"or set {binary.env_var} / KUBEBUILDER_ASSETS"
        )
    if shutil.which("go") is None:
        raise BinaryUnavailable(f"{binary.name}: the `go` command is needed to build it")
    builder = _BUILDERS[binary.name]
    builder()
    path = cached_path(binary)
    if not _is_executable(path):
        raise BinaryUnavailable(f"{binary.name}: build finished but {path} is missing")
    return path


# --- building -------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[devstack build] {message}", file=sys.stderr, flush=True)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", **(env or {})}
    started = time.monotonic()
    _log(f"$ {' '.join(args)}  (in {cwd})")
    proc = subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
        raise BinaryUnavailable(f"`{' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    _log(f"  ok in {time.monotonic() - started:.1f}s")
    return proc.stdout


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _install(built: Path, binary: Binary) -> None:
    target = cached_path(binary)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copy2(built, tmp)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(target)
    _log(f"installed {target}")


def _build_kubernetes(commands: tuple[Binary, ...], work_name: str) -> None:
    """Commands of k8s.io/kubernetes through a wrapper module.

    k8s.io/kubernetes points its staging modules at ./staging with replace
    directives, which only apply in the main module; the wrapper repeats them
    against the published v0.x.y releases of the same staging modules.
    """
    version = KUBERNETES_VERSION
    staging_version = "v0." + version.split(".", 1)[1]
    work = _fresh_dir(cache_dir() / "build" / f"{work_name}-{version}")
    _run(["go", "mod", "init", "dynabase.local/kubebuild"], work)
    info = json.loads(_run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], work))
    upstream = json.loads(_run(["go", "mod", "edit", "-json", info["GoMod"]], work))
    edits = [f"-require=k8s.io/kubernetes@{version}"]
    for replace in upstream.get("Replace") or []:
        new_path = replace["New"]["Path"]
        if new_path.startswith("./staging/"):
            module = replace["Old"]["Path"]
            edits.append(f"-replace={module}={module}@{staging_version}")
    _run(["go", "mod", "edit", *edits], work)
    _run(["go", "get", *(f"k8s.io/kubernetes/cmd/{b.name}@{version}" for b in commands)], work)
    prefix = "k8s.io/component-base/version"
    minor = version.split(".")[1]
    ldflags = " ".join(
        [
            "-s -w",
            f"-X {prefix}.gitVersion={version}",
            f"-X {prefix}.gitMajor=1",
            f"-X {prefix}.gitMinor={minor}",
            f"-X {prefix}.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion={version}",
        ]
    )
    for binary in commands:
        if find(binary) is not None:
            continue
        out = work / binary.name
        _run(
            ["go", "build", "-p", "2", "-trimpath", "-ldflags", ldflags, "-o", str(out),
             f"k8s.io/kubernetes/cmd/{binary.name}"],
            work,
            {"CGO_ENABLED": "0"},
        )
        _install(out, binary)
    shutil.rmtree(work, ignore_errors=True)


def _build_control_plane() -> None:
    _build_kubernetes(CONTROL_PLANE_BINARIES, "kubernetes")


def _build_node() -> None:
    _build_kubernetes(NODE_BINARIES, "kubernetes-node")


def _build_etcd() -> None:
    work = _fresh_dir(cache_dir() / "build" / f"etcd-{ETCD_VERSION}")
    _run(["go", "mod", "init", "dynabase.local/etcdbuild"], work)
    _run(["go", "get", f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}"], work)
    out = work / "etcd"
    _run(
        ["go", "build", "-p", "2", "-trimpath", "-ldflags", "-s -w", "-o", str(out),
         "go.etcd.io/etcd/server/v3"],
        work,
        {"CGO_ENABLED": "0"},
    )
    _install(out, ETCD)
    shutil.rmtree(work, ignore_errors=True)


def _build_ferretdb() -> None:
    """FerretDB embeds build/version/version.txt, which the module zip lacks."""
    version = FERRETDB_VERSION
    holder = _fresh_dir(cache_dir() / "build" / f"ferretdb-{version}-mod")
    _run(["go", "mod", "init", "dynabase.local/ferretfetch"], holder)
    info = json.loads(
        _run(["go", "mod", "download", "-json", f"github.com/FerretDB/FerretDB@{version}"], holder)
    )
    source = cache_dir() / "build" / f"ferretdb-{version}"
    if source.exists():
        shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(info["Dir"], source)
    for root, dirs, files in os.walk(source):
        for name in dirs + files:
            p = Path(root) / name
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    source.chmod(source.stat().st_mode | stat.S_IWUSR)
    (source / "build" / "version" / "version.txt").write_text(version + "\n")
    out = source / "bin" / "ferretdb"  # ./ferretdb is a package directory
    _run(
        ["go", "build", "-p", "2", "-buildvcs=false", "-trimpath", "-o", str(out), "./cmd/ferretdb"],
        source,
        {"CGO_ENABLED": "0"},
    )
    _install(out, FERRETDB)
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(holder, ignore_errors=True)


def _build_pause() -> None:
    if not PAUSE_SOURCE.exists():
        raise BinaryUnavailable(f"pause: its source {PAUSE_SOURCE} is missing (a source checkout has it)")
    work = _fresh_dir(cache_dir() / "build" / f"pause-{PAUSE.version}")
    shutil.copy2(PAUSE_SOURCE, work / "main.go")
    _run(["go", "mod", "init", "dynabase.local/pause"], work)
    out = work / "pause"
    _run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "."], work, {"CGO_ENABLED": "0"})
    _install(out, PAUSE)
    shutil.rmtree(work, ignore_errors=True)


def _build_stripe_mock() -> None:
    """`go install` into a private GOBIN: the module is a plain main package (spec and fixtures embedded)."""
    work = _fresh_dir(cache_dir() / "build" / f"stripe-mock-{STRIPE_MOCK_VERSION}")
    _run(["go", "install", "-trimpath", "-ldflags", "-s -w", f"github.com/stripe/stripe-mock@{STRIPE_MOCK_VERSION}"],
         work, {"CGO_ENABLED": "0", "GOBIN": str(work), "GOFLAGS": ""})
    _install(work / "stripe-mock", STRIPE_MOCK)
    shutil.rmtree(work, ignore_errors=True)


_BUILDERS = {
    "kube-apiserver": _build_control_plane,
    "kubectl": _build_control_plane,
    **{binary.name: _build_node for binary in NODE_BINARIES},
    "pause": _build_pause,
    "etcd": _build_etcd,
    "ferretdb": _build_ferretdb,
    "stripe-mock": _build_stripe_mock,
}


def build_all(*, only: list[str] | None = None) -> dict[str, Path | str]:
    """Ensure every binary; returns name → path, or name → error text."""
    results: dict[str, Path | str] = {}
    for binary in ALL_BINARIES:
        if only and binary.name not in only:
            continue
        started = time.monotonic()
        try:
            results[binary.name] = ensure(binary)
            _log(f"{binary.name} {binary.version}: ready ({time.monotonic() - started:.1f}s)")
        except BinaryUnavailable as exc:
            results[binary.name] = str(exc)
            _log(f"{binary.name} {binary.version}: UNAVAILABLE: {exc}")
    return results
