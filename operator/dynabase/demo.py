"""The main job on the local stack: bring it up, declare the examples, show the result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynabase.devstack.stack import ALL_SERVICES, Devstack, DevstackError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CRDS = Path(__file__).resolve().parents[2] / "crds"


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def _kubectl(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [env["DYNABASE_KUBECTL"], *args],
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        capture_output=True, text=True, check=False, timeout=120,
    )
    if proc.returncode != 0:
        raise DevstackError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def run_demo(root: Path | None, *, keep: bool) -> int:
    started = time.monotonic()
    owns_root = root is None
    root = root or Path(tempfile.mkdtemp(prefix="dynabase-demo-"))
    stack = Devstack(root)
    try:
        _step(f"Starting the local stack in {root} (real servers on loopback)")
        stack.up(ALL_SERVICES)
        env = stack.env()
        _step("Applying the CRDs generated from dynabase.spec")
        print(_kubectl(env, "apply", "-f", str(CRDS)), end="")
        for crd in ("tenantdatabases.dynabase.io", "tierpolicies.dynabase.io"):
            _kubectl(env, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        _step("Applying the example TierPolicy and TenantDatabases")
        print(_kubectl(env, "apply", "-R", "-f", str(EXAMPLES)), end="")
        _step("kubectl get tenantdatabases")
        print(_kubectl(env, "get", "tenantdatabases", "-A", "-o", "wide"), end="")
        _step(f"Done in {time.monotonic() - started:.1f}s")
        if keep:
            print(f"The stack keeps running; `dynabase devstack env --dir {root}` prints its settings, "
                  f"`dynabase devstack down --dir {root}` stops it.")
        return 0
    except DevstackError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            stack.down()
            if owns_root:
                shutil.rmtree(root, ignore_errors=True)
