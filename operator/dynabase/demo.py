"""The main job on the local stack: bring it up, declare the examples, show the result."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynabase.devstack.processes import DevstackError
from dynabase.devstack.stack import ALL_SERVICES, Devstack, free_port

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
    # It listens once it has read the limits and pool ports from Redis.
    deadline = time.monotonic() + 30
    while not _accepts(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise DevstackError(f"the proxy did not listen on {port}; see {root / 'logs' / 'proxy.log'}")
        time.sleep(0.05)
    return proc


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _refusal(exc: Exception) -> str:
    """A server's refusal as it said it: SQLSTATE and message."""
    return f"{getattr(exc, 'sqlstate', '?')} {str(exc).splitlines()[0]}"


async def _open_until_refused(dsn: str, most: int) -> tuple[list[Any], str | None]:
    """Connections opened one by one until the server refuses one (its refusal) or ``most`` are open."""
    import asyncpg

    held: list[asyncpg.Connection] = []
    while len(held) < most:
        try:
            held.append(await asyncpg.connect(dsn, statement_cache_size=0))
        except asyncpg.PostgresError as exc:
            return held, _refusal(exc)
    return held, None


def _opened(count: int, refusal: str | None, most: int) -> str:
    if refusal is None:
        return f"opened {count}, none refused (stopped trying at {most})"
    return f"opened {count}, the next refused: {refusal}"


async def _show_proxy(env: dict[str, str], port: int, seconds: float = 5.0) -> None:
    """Each tenant's limits as the operator published them to the proxy, and what traffic measured."""
    import asyncpg
    import redis.asyncio as aioredis

    from dynabase.keyspace import LIMITS_KEY, decode_limits

    redis = aioredis.Redis.from_url(env["DYNABASE_REDIS_URL"], decode_responses=True)
    try:
        published = {name: decode_limits(str(await redis.hget(LIMITS_KEY, name)))
                     for name in ("acme", "globex")}
    finally:
        await redis.aclose()
    for name, limits in published.items():
        dsn = f"postgresql://{name}:{_password(env, name)}@127.0.0.1:{port}/{name}"
        most = min(limits.max_connections + 1, 30)
        held, refusal = await _open_until_refused(dsn, most)
        if not held:
            print(f"  {name}: the first connection through the proxy was refused: {refusal}")
            continue
        conn = held[0]
        finished: list[float] = []
        rejections: list[str] = []
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            try:
                await conn.execute("SELECT 1")
                finished.append(time.monotonic() - began)
            except asyncpg.PostgresError as exc:
                rejections.append(_refusal(exc))
        for c in held:
            await c.close()
        per_second = [sum(1 for t in finished if second <= t < second + 1) for second in range(int(seconds))]
        print(f"  {name} ({limits.tier}); published to the proxy: maxConnections {limits.max_connections}, "
              f"qps {limits.qps}, burst {limits.burst}, overLimit {limits.over_limit}, "
              f"queueTimeout {limits.queue_timeout_ms} ms")
        print(f"    connections through the proxy: {_opened(len(held), refusal, most)}")
        print(f"    one client sending SELECT 1 back to back, queries answered in each second: "
              f"{', '.join(map(str, per_second))}; {len(rejections)} rejected"
              + (f" (first: {rejections[0]})" if rejections else ""))


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
    """What Postgres and PgBouncer hold for each tenant, and what a client measured against it."""
    import asyncpg

    from dynabase.backends.pgbouncer import PgBouncerBackend

    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"])
    admin = await asyncpg.connect(env["DYNABASE_POSTGRES_DSN"])
    try:
        for name in ("acme", "globex"):
            limit = await admin.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", name)
            dsn = f"postgresql://{name}:{_password(env, name)}@127.0.0.1:{env['PGPORT']}/{name}"
            held, refusal = await _open_until_refused(dsn, limit + 1)
            if not held:
                print(f"  {name}: its first connection to Postgres was refused: {refusal}")
                continue
            timeout_ms = int(await held[0].fetchval("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"))
            if 0 < timeout_ms <= 15_000:
                began = time.monotonic()
                try:
                    await held[0].execute(f"SELECT pg_sleep({timeout_ms / 1000 + 1})")
                    long_query = f"pg_sleep({timeout_ms / 1000 + 1:g}) ran to its end"
                except asyncpg.PostgresError as exc:
                    long_query = (f"pg_sleep({timeout_ms / 1000 + 1:g}) ended after {time.monotonic() - began:.1f}s: "
                                  f"{_refusal(exc)}")
            else:
                long_query = "not tried (it would take over 15s)"
            for conn in held:
                await conn.close()
            route = await pgbouncer.route(name)
            print(f"  {name}")
            print(f"    Postgres role (pg_roles.rolconnlimit {limit}): {_opened(len(held), refusal, limit + 1)}")
            print(f"    statement_timeout {timeout_ms} ms (pg_settings, in its session): {long_query}")
            print(f"    PgBouncer: {_pool_line(env, name, route)}")
    finally:
        await admin.close()
        await pgbouncer.close()


def _pool_line(env: dict[str, str], database: str, route: tuple[str, int] | None) -> str:
    """The tenant's database as its PgBouncer pool reports it (admin console, SHOW DATABASES)."""
    import psycopg

    if route is None:
        return "no pool reported by the agent"
    pool, port = route
    with psycopg.connect(env["DYNABASE_PGBOUNCER_ADMIN_DSN"], port=port, autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as conn:
        cursor = conn.execute("SHOW DATABASES")
        names = [d.name for d in cursor.description or []]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        config = {str(key): str(value) for key, value, *_ in conn.execute("SHOW CONFIG").fetchall()}
    row = next((r for r in rows if r["name"] == database), None)
    if row is not None:
        return (f"pool {pool} on port {port}, its own entry (SHOW DATABASES): pool_size {row['pool_size']}, "
                f"pool_mode {row['pool_mode']}, max_db_connections {row['max_connections']}")
    return (f"pool {pool} on port {port}, served with the pool's settings (SHOW CONFIG): "
            f"default_pool_size {config.get('default_pool_size')}, pool_mode {config.get('pool_mode')}, "
            f"max_db_connections {config.get('max_db_connections')}")


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
