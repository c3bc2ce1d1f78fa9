"""Scale to zero: connection + first query latency of a Cold tenant vs a warm one.

    python -m bench.coldstart --rounds 30

Each round: a query through the proxy (warm: PgBouncer holds a server
connection), then idleness past the tier's idleTimeout (1s here), a reconcile
pass that makes the tenant Cold (its sessions ended, PgBouncer's server
connection with them), and a new connection + SELECT 1 through the proxy, timed.
Prints p50/p99 for cold and warm and their ratio (goal: cold p99 <= 500 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from bench.common import devstack, proxy_engine
from bench.proxy import start_proxy
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine
from dynabase.spec import TenantDatabase, TierPolicy

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "cold"},
    "spec": {"tiers": {"NAP": {"rank": 0, "postgres": {"connectionLimit": 10},
                               "pgbouncer": {"poolSize": 2, "poolMode": "transaction"},
                               "proxy": {"maxConnections": 10}, "lifecycle": {"idleTimeout": "1s"}}}},
})
TENANT = TenantDatabase.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
    "metadata": {"name": "cold-tenant", "namespace": "bench", "generation": 1},
    "spec": {"orgId": "bench", "tier": "NAP", "tierPolicyRef": "cold", "databaseName": "cold_tenant"},
})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def connect_and_query(port: int, password: str) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="cold_tenant", password=password,
                                 database="cold_tenant", ssl=False, statement_cache_size=0)
    try:
        await conn.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000
    finally:
        await conn.close()


async def sessions(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'cold_tenant' AND backend_type = 'client backend'"))
    finally:
        await conn.close()


async def run(env: dict[str, str], rounds: int) -> None:
    engine, secrets = await proxy_engine(env)
    policies = {"cold": POLICY}
    first = await engine.reconcile_all(policies, [TENANT])
    assert first.tenants[0].ready, first.tenants[0].outcomes
    password = secrets.passwords[TENANT.key]
    port, metrics = free_port(), free_port()
    proxy = start_proxy({"DYNABASE_REDIS_URL": env["DYNABASE_REDIS_URL"]}, port, metrics, "cold-bench")
    cold_ms: list[float] = []
    warm_ms: list[float] = []
    try:
        await asyncio.sleep(1.0)
        for n in range(rounds):
            warm_ms.append(await connect_and_query(port, password))  # PgBouncer now holds a server connection
            warm_ms.append(await connect_and_query(port, password))
            await asyncio.sleep(2.3)  # the proxy flushes activity (1s), then more than idleTimeout passes
            result = (await engine.reconcile_all(policies, [TENANT])).tenants[0]
            assert result.status is not None and result.status.phase == "Cold", result.outcomes
            assert await sessions(env["DYNABASE_POSTGRES_DSN"]) == 0
            await asyncio.sleep(0.1)  # the Cold mark reaches the proxy over pub/sub
            cold_ms.append(await connect_and_query(port, password))
            woke = (await engine.reconcile_all(policies, [TENANT])).tenants[0]
            assert woke.status is not None and woke.status.phase == "Active", woke.outcomes
            print(f"round {n + 1}/{rounds}: cold {cold_ms[-1]:.1f} ms, warm {warm_ms[-1]:.1f} ms", flush=True)
    finally:
        proxy.terminate()
        proxy.wait(10)
        await close_engine(engine)
    print(f"cold start (connect + SELECT 1 through the proxy after the tenant went Cold), {rounds} rounds:")
    print(f"  cold  p50 {pct(cold_ms, 0.5):6.1f} ms  p99 {pct(cold_ms, 0.99):6.1f} ms  "
          f"mean {statistics.mean(cold_ms):6.1f} ms")
    print(f"  warm  p50 {pct(warm_ms, 0.5):6.1f} ms  p99 {pct(warm_ms, 0.99):6.1f} ms  "
          f"mean {statistics.mean(warm_ms):6.1f} ms")
    print(f"  cold / warm: p50 {pct(cold_ms, 0.5) / pct(warm_ms, 0.5):.2f}x, "
          f"p99 {pct(cold_ms, 0.99) / pct(warm_ms, 0.99):.2f}x (goal: cold p99 <= 500 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        asyncio.run(run(env, args.rounds))


if __name__ == "__main__":
    main()
