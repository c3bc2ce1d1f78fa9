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


def _apply(env: dict[str, str], secrets_dir: Path) -> int:
    from dynabase.cli import main as cli_main

    saved = dict(os.environ)
    os.environ.update(env)
    os.environ["DYNABASE_SECRETS_DIR"] = str(secrets_dir)
    try:
        return cli_main(["apply", str(EXAMPLES)])
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _show_limits(env: dict[str, str], secrets_dir: Path) -> None:
    import asyncpg

    from dynabase.backends.pgbouncer import PgBouncerBackend

    port = env["PGPORT"]
    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"])
    rows: list[tuple[str, ...]] = []
    try:
        for name, db in (("acme", "acme"), ("globex", "globex")):
            password = (secrets_dir / f"default__{name}").read_text().strip()
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
        print(_kubectl(env, "apply", "-f", str(CRDS)), end="")
        for crd in ("tenantdatabases.dynabase.io", "tierpolicies.dynabase.io"):
            _kubectl(env, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        _step("Applying the example TierPolicy and TenantDatabases")
        print(_kubectl(env, "apply", "-R", "-f", str(EXAMPLES)), end="")
        _step("Reconciling the examples: Postgres roles and databases, PgBouncer pools")
        secrets_dir = root / "secrets"
        code = _apply(env, secrets_dir)
        if code != 0:
            return code
        _step("Limits enforced on the real servers")
        asyncio.run(_show_limits(env, secrets_dir))
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
