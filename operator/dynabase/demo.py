"""The main job on the local stack: bring it up, declare the examples, show the result."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynabase.devstack.stack import ALL_SERVICES, Devstack, DevstackError, free_port

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


def _start_operator(env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    log = open(root / "logs" / "operator.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "operator", "--drift-interval", "10",
         "--metrics-port", "0", "--liveness-port", "0"],
        env={**os.environ, **env, "DYNABASE_LOG_LEVEL": "INFO"}, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def _start_proxy(env: dict[str, str], root: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(root / "logs" / "proxy.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "proxy", "--listen", f"127.0.0.1:{port}", "--metrics-port", "0"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    time.sleep(1.5)
    return proc


async def _show_proxy(env: dict[str, str], port: int, seconds: float = 3.0) -> None:
    import asyncpg

    rows: list[tuple[str, ...]] = []
    # Each tier's burst (20 and 400 in the examples) is spent first, so the rate shown is the steady one.
    for name, tier, burst in (("acme", "FREE", 20), ("globex", "PRO", 400)):
        dsn = f"postgresql://{name}:{_password(env, name)}@127.0.0.1:{port}/{name}"
        held: list[asyncpg.Connection] = []
        sixth = "accepted"
        for _ in range(6):
            try:
                held.append(await asyncpg.connect(dsn, statement_cache_size=0))
            except asyncpg.TooManyConnectionsError as exc:
                sixth = f"refused ({exc.sqlstate})"
        conn = held[0]
        for _ in range(burst + 5):
            await conn.execute("SELECT 1")
        done, rejected = 0, 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                await conn.execute("SELECT 1")
                done += 1
            except asyncpg.PostgresError:
                rejected += 1
        for c in held:
            await c.close()
        rows.append((name, tier, sixth, f"{done / seconds:.1f}", str(rejected)))
    header = ("tenant", "tier", "6th connection", "queries/s (steady)", "rejected")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print("FREE allows 5 connections and 10 queries/s (throttled, then rejected after 1s in the queue); "
          "PRO allows 200 connections and 200 queries/s.")


def _wait_ready(env: dict[str, str], expected: list[str], timeout: float = 120) -> None:
    import json

    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    while time.monotonic() < deadline:
        items = json.loads(_kubectl(env, "get", "tenantdatabases", "-A", "-o", "json"))["items"]
        ready = {
            i["metadata"]["name"] for i in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in i.get("status", {}).get("conditions", []))
        }
        print(f"  ready: {len(ready)}/{len(items)}", flush=True)
        if len(ready) == len(items) and items:
            return
        time.sleep(1)
    raise DevstackError(f"tenants not Ready after {timeout:.0f}s: ready={sorted(ready)}")


def _summary(env: dict[str, str]) -> None:
    import json

    items = json.loads(_kubectl(env, "get", "tenantdatabases", "-A", "-o", "json"))["items"]
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        conditions = {c["type"]: c for c in item.get("status", {}).get("conditions", [])}
        parts = [f"{t}: {conditions[t]['message']}" for t in ("PostgresReady", "PgBouncerReady", "ProxyReady")
                 if t in conditions]
        print(f"  {item['metadata']['name']:<14} {item['status'].get('appliedTier', '?'):<11} " + " | ".join(parts))


def _password(env: dict[str, str], tenant: str) -> str:
    import base64

    data = _kubectl(env, "get", "secret", f"{tenant}-dynabase-password", "-o", "jsonpath={.data.password}")
    return base64.b64decode(data).decode()


async def _show_limits(env: dict[str, str]) -> None:
    import asyncpg

    from dynabase.backends.pgbouncer import PgBouncerBackend

    port = env["PGPORT"]
    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"])
    rows: list[tuple[str, ...]] = []
    try:
        for name, db in (("acme", "acme"), ("globex", "globex")):
            password = _password(env, name)
            dsn = f"postgresql://{db}:{password}@127.0.0.1:{port}/{db}"
            held: list[asyncpg.Connection] = []
            refused = "no"
            for _ in range(6):
                try:
                    held.append(await asyncpg.connect(dsn))
                except asyncpg.TooManyConnectionsError as exc:
                    refused = f"yes ({exc.sqlstate})"
                    break
            timeout = await held[0].fetchval("SHOW statement_timeout")
            try:
                await held[0].execute("SELECT pg_sleep(11)" if db == "acme" else "SELECT pg_sleep(0.1)")
                slow = "ran"
            except asyncpg.QueryCanceledError:
                slow = "cancelled at 10s"
            for conn in held:
                await conn.close()
            route = await pgbouncer.route(db)
            rows.append((name, db, f"{len(held)}", refused, timeout, slow, f"{route[0]}:{route[1]}" if route else "-"))
    finally:
        await pgbouncer.close()
    header = ("tenant", "database", "conns opened", "6th refused", "statement_timeout", "long query", "pgbouncer pool")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


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
        print(_kubectl(env, "apply", "-k", str(CRDS)), end="")
        for crd in ("tenantdatabases.dynabase.io", "tierpolicies.dynabase.io"):
            _kubectl(env, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        _step("Applying the example TierPolicy and TenantDatabases")
        print(_kubectl(env, "apply", "-f", str(EXAMPLES / "tierpolicy-default.yaml"),
                       "-f", str(EXAMPLES / "tenants")), end="")
        _step("Starting the operator (dynabase operator) against the local apiserver")
        operator = _start_operator(env, root)
        try:
            _wait_ready(env, [p.stem for p in (EXAMPLES / "tenants").glob("*.yaml")])
            _step("kubectl get tenantdatabases")
            print(_kubectl(env, "get", "tenantdatabases", "-A", "-o", "wide"), end="")
            _step("What each tenant got (from its status conditions)")
            _summary(env)
            _step("Limits enforced on the real servers")
            asyncio.run(_show_limits(env))
            _step("Traffic through the tenant proxy (client -> dynabase proxy -> PgBouncer -> Postgres)")
            proxy_port = free_port()
            proxy = _start_proxy(env, root, proxy_port)
            try:
                asyncio.run(_show_proxy(env, proxy_port))
            finally:
                proxy.terminate()
                proxy.wait(timeout=30)
        finally:
            operator.terminate()
            operator.wait(timeout=30)
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
