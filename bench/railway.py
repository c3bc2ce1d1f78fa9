"""Headless passes with Railway: wall time and Railway requests per pass.

    python -m bench.railway --tenants 1000 --services 100 --environments 2

A folder of N tenant manifests (the first ``--services`` with a dedicated Railway
service, spread over ``--environments``) is reconciled by headless mode against
the devstack's real Postgres and PgBouncer and a fake Railway (tests/railway/fake.py,
Railway's own API being the one thing not run here). Printed per pass: seconds and
Railway requests by operation — converge, no drift, a merged PR that changes 10%
of the tiers — once with limits carried in the environment config and once without.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.railway.fake import FakeRailway

from bench.common import ROOT, TIERS, devstack
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.railway import OwnService, RailwayAuth, RailwayBackend, RailwayClient
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource

PROJECT = "proj-bench"


def manifest(i: int, tier: str, services: int, environments: int, run: str) -> str:
    text = (f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata:\n  name: rw-{run}-{i:05d}\n"
            f"  namespace: bench\nspec:\n  orgId: org-{i}\n  tier: {tier}\n")
    if i < services:
        text += (f"  railway:\n    projectId: {PROJECT}\n    environmentId: env-{i % environments}\n"
                 f"    serviceName: svc-{i:05d}\n")
    return text


def describe(requests: Counter[str]) -> str:
    total = sum(requests.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
    return f"{total} requests ({parts or 'none'})"


async def run(count: int, services: int, environments: int, env: dict[str, str], config_has_limits: bool) -> None:
    fake = FakeRailway("bench-token", config_has_limits=config_has_limits)
    await fake.start()
    for i in range(services):
        fake.add_service(f"env-{i % environments}", PROJECT, f"svc-{i:05d}")
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"], pool_size=8)
    await postgres.start()
    railway = RailwayBackend(RailwayClient(RailwayAuth(fake.token), url=fake.url, hourly_budget=100_000),
                             own=OwnService(None, None))
    engine = Engine(postgres=postgres, pgbouncer=PgBouncerBackend(env["DYNABASE_REDIS_URL"], confirm_timeout=30),
                    secrets=MemorySecretStore(), status_store=MemoryStatusStore(), railway=railway)
    run_id = "l" if config_has_limits else "n"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "tierpolicy.yaml").write_text((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
        tiers = [TIERS[i % len(TIERS)] for i in range(count)]

        def write() -> None:
            for i, tier in enumerate(tiers):
                (root / f"t{i:05d}.yaml").write_text(manifest(i, tier, services, environments, run_id))

        write()
        headless = HeadlessReconciler(engine, DirectorySource(root))
        label = "limits in environment config" if config_has_limits else "limits read per service"
        print(f"-- {count} tenants, {services} Railway services in {environments} environment(s); {label}")
        try:
            for step in ("converge from empty", "no drift", "no drift again", "PR: 10% change tier", "no drift"):
                if step.startswith("PR"):
                    for i in range(0, count, 10):
                        tiers[i] = TIERS[(TIERS.index(tiers[i]) + 1) % len(TIERS)]
                    write()
                fake.reset_counts()
                started = time.monotonic()
                result = await headless.run_once()
                seconds = time.monotonic() - started
                assert result is not None
                ready = sum(t.ready for t in result.tenants)
                deploys = fake.requests["ServiceDeploy"]
                print(f"{step:22s} {seconds:6.2f}s  {ready}/{count} ready  Railway: {describe(fake.requests)}; "
                      f"{len(fake.mutations)} mutations, {deploys} deploys", flush=True)
        finally:
            await railway.close()
            await engine.pgbouncer.close()  # type: ignore[union-attr]
            await postgres.close()
            await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100, help="tenants with a dedicated Railway service")
    parser.add_argument("--environments", type=int, default=2)
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        for config_has_limits in (False, True):
            asyncio.run(run(args.tenants, min(args.services, args.tenants), args.environments, env,
                            config_has_limits))


if __name__ == "__main__":
    main()
