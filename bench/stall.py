"""Stall: latency of a steady pgbench stream on one tenant while other tenants' tiers change.

    python -m bench.stall --tenants 200 --seconds 8

Scenarios, each a separate pgbench run through the victim tenant's PgBouncer pool:
  baseline            nothing changes
  tier-changes        another tenant flips FREE<->STARTER every 0.5s (a route change: no reload)
  reload-N-entries    a tenant's pool override changes every 0.5s in the victim's own pool,
                      which also holds N explicit entries (N = 0, 1000, 10000): a real RELOAD
Prints p50/p99/max transaction latency per scenario (from pgbench's per-transaction log).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import devstack, policy, tenants
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.desired.pgbouncer import PgBouncerDesired, PoolSettings, TenantRoute
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.spec import TenantDatabase


def pgbench(port: int, user: str, password: str, seconds: int, workdir: Path) -> subprocess.Popen[bytes]:
    script = workdir / "select1.sql"
    script.write_text("SELECT 1;\n")
    for old in glob.glob(str(workdir / "pgbench_log*")):
        os.unlink(old)
    return subprocess.Popen(
        ["pgbench", "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-M", "simple", "-f", str(script),
         "-l", "--log-prefix", str(workdir / "pgbench_log"), "-h", "127.0.0.1", "-p", str(port), "-U", user, user],
        env={**os.environ, "PGPASSWORD": password}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def latencies_ms(workdir: Path) -> list[float]:
    out: list[float] = []
    for path in glob.glob(str(workdir / "pgbench_log*")):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                out.append(int(parts[2]) / 1000)
    return out


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    p99 = values[int(len(values) * 0.99) - 1] if values else float("nan")
    return (f"{name:<24} n={len(values):>7}  p50={statistics.median(values):6.3f} ms  "
            f"p99={p99:6.3f} ms  max={values[-1]:7.3f} ms")


async def main_async(args: argparse.Namespace, env: dict[str, str]) -> None:
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"], pool_size=8)
    await postgres.start()
    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"], confirm_timeout=60)
    secrets = MemorySecretStore()
    engine = Engine(postgres=postgres, pgbouncer=pgbouncer, secrets=secrets, status_store=MemoryStatusStore())
    policies = {"default": policy()}
    declared = tenants(args.tenants)
    victim = next(t for t in declared if t.spec.tier == "FREE")
    flipper = next(t for t in declared if t.spec.tier == "FREE" and t is not victim)
    await engine.reconcile_all(policies, declared, complete=True)
    route = await pgbouncer.route(victim.database_name)
    assert route is not None
    port = route[1]
    workdir = Path(tempfile.mkdtemp(prefix="dynabase-stall-"))
    password = secrets.passwords[victim.key]

    def with_tier(tenant: TenantDatabase, tier: str, **spec: object) -> TenantDatabase:
        raw = tenant.model_dump(by_alias=True, exclude_none=True, mode="json")
        raw["spec"].update({"tier": tier, **spec})
        return TenantDatabase.model_validate(raw)

    async def run(name: str, change: object = None) -> None:
        proc = pgbench(port, victim.database_name, password, args.seconds, workdir)
        changes = 0
        deadline = time.monotonic() + args.seconds
        await asyncio.sleep(0.5)
        while proc.poll() is None and time.monotonic() < deadline - 0.5 and change is not None:
            await change(changes)  # type: ignore[operator]
            changes += 1
            await asyncio.sleep(0.5)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"pgbench failed: {err.decode()}")
        print(summary(name, latencies_ms(workdir)) + f"  changes={changes}", flush=True)

    async def flip_tier(i: int) -> None:
        tier = "STARTER" if i % 2 == 0 else "FREE"
        current = [with_tier(flipper, tier) if t is flipper else t for t in declared]
        await engine.reconcile_all(policies, current, complete=True)

    async def reload_with_entries(extra: int) -> object:
        # Synthetic explicit entries in the victim's pool: PgBouncer reads each on RELOAD.
        base = (await pgbouncer.observe()).published
        assert base is not None
        extra_routes = {
            f"x{i:05d}": TenantRoute(f"x{i:05d}", f"x{i:05d}", "default.FREE", PoolSettings(2, 0, 0, 0, "transaction"))
            for i in range(extra)
        }

        async def change(i: int) -> None:
            layout = PgBouncerDesired(dict(base.pools), {**base.routes, **extra_routes})
            layout.routes["zz_override"] = TenantRoute(
                "zz_override", "zz_override", "default.FREE", PoolSettings(2 + i % 2, 0, 0, 0, "transaction")
            )
            version = layout.version
            await pgbouncer.wait_confirmed(await pgbouncer.publish(layout, version))

        await change(1)  # load the entries once before measuring
        return change

    try:
        await run("baseline")
        await run("tier-changes", flip_tier)
        for extra in args.entries:
            await run(f"reload-{extra}-entries", await reload_with_entries(extra))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        await postgres.close()
        await pgbouncer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--entries", type=int, nargs="*", default=[0, 1000, 10000])
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        asyncio.run(main_async(args, env))


if __name__ == "__main__":
    main()
