"""Converge N tenants from empty, then a pass with no drift (Postgres + PgBouncer).

    python -m bench.converge --tenants 1000
    python -m bench.converge --tenants 10000 --pool 10000 --stack-dir /mnt/big

Prints wall time and statements written; the no-drift pass must write 0. With
--pool the default TierPolicy keeps that many databases ready: the pool is
filled first (timed: that is CREATE DATABASE's rate), then the tenants claim
them; the refill is held back while they do, so the converge shows the claims.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis

from bench.common import devstack, policy, tenants
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.redis_acl import RedisBackend
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.spec import TierPolicy


def redis_calls(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def run(count: int, concurrency: int, env: dict[str, str], *, tenant_redis: bool, mongo: bool,
              pool: int) -> None:
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"], pool_size=concurrency)
    await postgres.start()
    pgbouncer = PgBouncerBackend(env["DYNABASE_REDIS_URL"], confirm_timeout=30)
    statuses = MemoryStatusStore()
    engine = Engine(postgres=postgres, pgbouncer=pgbouncer, secrets=MemorySecretStore(), status_store=statuses,
                    concurrency=concurrency, proxy=ProxyBackend(env["DYNABASE_REDIS_URL"]),
                    redis=RedisBackend(env["DYNABASE_REDIS_URL"]) if tenant_redis else None,
                    mongo=MongoBackend(env["DYNABASE_MONGO_URL"]) if mongo else None)
    policies = {"default": policy()}
    if pool:
        raw = policies["default"].model_dump(by_alias=True, exclude_none=True, mode="json")
        raw["spec"]["warmPool"] = {"size": pool}
        policies = {"default": TierPolicy.model_validate(raw)}
    declared = tenants(count)
    try:
        if pool:
            started = time.monotonic()
            await engine.keep_warm(policies)
            await engine.warm_pool.until_full()
            seconds = time.monotonic() - started
            print(f"warm pool: {pool} databases made in {seconds:.1f}s ({pool / seconds:.1f}/s)", flush=True)
            engine.warm_pool.refill = False
            await engine.warm_pool.close()
        started = time.monotonic()
        first = await engine.reconcile_all(policies, declared, complete=True)
        converge_s = time.monotonic() - started
        ready = sum(t.ready for t in first.tenants)
        print(f"converge from empty: {count} tenants in {converge_s:.1f}s "
              f"({count / converge_s:.0f}/s), {first.writes} statements, {ready}/{count} ready, "
              f"{pgbouncer.writes} PgBouncer layout publish(es)", flush=True)
        for label in ("no-drift pass #1", "no-drift pass #2"):
            status_writes, publishes = statuses.writes, pgbouncer.writes
            calls = redis_calls(env["DYNABASE_REDIS_URL"])
            redis_writes = engine.redis.writes if engine.redis else 0
            mongo_writes = engine.mongo.writes if engine.mongo else 0
            started, cpu = time.monotonic(), time.process_time()
            quiet = await engine.reconcile_all(policies, declared, complete=True)
            seconds, cpu = time.monotonic() - started, time.process_time() - cpu
            extra = ""
            if engine.redis:
                extra += f", Redis ACL writes {engine.redis.writes - redis_writes}"
            if engine.mongo:
                extra += f", MongoDB writes {engine.mongo.writes - mongo_writes}"
            print(f"{label}: {seconds:.2f}s ({cpu:.2f}s of the engine's CPU), {quiet.writes} statements written, "
                  f"{statuses.writes - status_writes} status writes, {pgbouncer.writes - publishes} publishes, "
                  f"{redis_calls(env['DYNABASE_REDIS_URL']) - calls - 1} Redis commands in all{extra}",
                  flush=True)
    finally:
        await engine.warm_pool.close()
        await postgres.close()
        await pgbouncer.close()
        for backend in (engine.proxy, engine.redis, engine.mongo):
            if backend is not None:
                await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--redis", action="store_true", help="also tenant ACL users and quotas")
    parser.add_argument("--mongo", action="store_true", help="also MongoDB users and org records (FerretDB)")
    parser.add_argument("--pool", type=int, default=0, help="warm pool size, filled before the converge")
    parser.add_argument("--stack-dir", help="put the devstack (Postgres' data) under this folder")
    args = parser.parse_args()
    services = ["postgres", "redis", "pgbouncer", *(["ferretdb"] if args.mongo else [])]
    with devstack(services, parent=args.stack_dir) as env:
        asyncio.run(run(args.tenants, args.concurrency, env, tenant_redis=args.redis, mongo=args.mongo,
                        pool=args.pool))


if __name__ == "__main__":
    main()
