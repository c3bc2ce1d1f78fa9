"""Converge N tenants from empty, then a pass with no drift (Postgres + PgBouncer).

    python -m bench.converge --tenants 1000

Prints wall time and statements written; the no-drift pass must write 0.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import devstack, policy, tenants
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore


async def run(count: int, concurrency: int, env: dict[str, str]) -> None:
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"], pool_size=concurrency)
    await postgres.start()
    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"], confirm_timeout=30)
    statuses = MemoryStatusStore()
    engine = Engine(postgres=postgres, pgbouncer=pgbouncer, secrets=MemorySecretStore(), status_store=statuses,
                    concurrency=concurrency)
    policies = {"default": policy()}
    declared = tenants(count)
    try:
        started = time.monotonic()
        first = await engine.reconcile_all(policies, declared, complete=True)
        converge_s = time.monotonic() - started
        ready = sum(t.ready for t in first.tenants)
        print(f"converge from empty: {count} tenants in {converge_s:.1f}s "
              f"({count / converge_s:.0f}/s), {first.writes} statements, {ready}/{count} ready, "
              f"{pgbouncer.writes} PgBouncer layout publish(es)", flush=True)
        for label in ("no-drift pass #1", "no-drift pass #2"):
            status_writes, publishes = statuses.writes, pgbouncer.writes
            started = time.monotonic()
            quiet = await engine.reconcile_all(policies, declared, complete=True)
            seconds = time.monotonic() - started
            print(f"{label}: {seconds:.2f}s, {quiet.writes} statements written, "
                  f"{statuses.writes - status_writes} status writes, {pgbouncer.writes - publishes} publishes",
                  flush=True)
    finally:
        await postgres.close()
        await pgbouncer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        asyncio.run(run(args.tenants, args.concurrency, env))


if __name__ == "__main__":
    main()
