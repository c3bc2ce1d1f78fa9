"""Building an engine from settings, for the CLI and headless mode."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.redis_acl import RedisBackend
from dynabase.backends.status_pg import PostgresStatusStore

from .reconciler import Clock, Engine, utcnow
from .stores import DirectorySecretStore, SecretStore, StatusStore


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class EngineSettings:
    postgres_dsn: str
    secrets_dir: Path
    concurrency: int = 8
    redis_url: str | None = None  # where the PgBouncer layout is published; None = no PgBouncer
    # The Redis that tenants use (ACL users, quotas); by default the same one.
    tenant_redis_url: str | None = None
    mongo_url: str | None = None  # tenant users and the organizations/tenantUsage collections

    @classmethod
    def from_env(cls, *, postgres_dsn: str | None = None, secrets_dir: str | None = None,
                 concurrency: int | None = None, redis_url: str | None = None) -> EngineSettings:
        dsn = postgres_dsn or os.environ.get("DYNABASE_POSTGRES_DSN")
        if not dsn:
            raise SettingsError(
                "no Postgres to reconcile: pass --postgres-dsn or set DYNABASE_POSTGRES_DSN "
                "(`eval \"$(dynabase devstack env)\"` sets it for the local stack)"
            )
        directory = secrets_dir or os.environ.get("DYNABASE_SECRETS_DIR") or os.path.expanduser(
            "~/.local/share/dynabase/secrets"
        )
        return cls(
            dsn, Path(directory), concurrency or int(os.environ.get("DYNABASE_CONCURRENCY", "8")),
            redis_url=redis_url or os.environ.get("DYNABASE_REDIS_URL"),
            tenant_redis_url=os.environ.get("DYNABASE_TENANT_REDIS_URL") or redis_url
            or os.environ.get("DYNABASE_REDIS_URL"),
            mongo_url=os.environ.get("DYNABASE_MONGO_URL"),
        )


async def start_engine(
    settings: EngineSettings, *, clock: Clock = utcnow,
    secrets: SecretStore | None = None, status_store: StatusStore | None = None,
) -> Engine:
    """An engine with its backends connected; ``close_engine`` releases them."""
    postgres = PostgresBackend(settings.postgres_dsn, pool_size=max(2, settings.concurrency))
    await postgres.start()
    pgbouncer = PgBouncerBackend(settings.redis_url) if settings.redis_url else None
    proxy = ProxyBackend(settings.redis_url) if settings.redis_url else None
    tenant_redis = RedisBackend(settings.tenant_redis_url) if settings.tenant_redis_url else None
    mongo = MongoBackend(settings.mongo_url) if settings.mongo_url else None
    return Engine(
        postgres=postgres,
        pgbouncer=pgbouncer,
        proxy=proxy,
        redis=tenant_redis,
        mongo=mongo,
        secrets=secrets or DirectorySecretStore(settings.secrets_dir),
        status_store=status_store or PostgresStatusStore(postgres.pool),
        clock=clock,
        concurrency=settings.concurrency,
    )


async def close_engine(engine: Engine) -> None:
    await engine.postgres.close()
    if engine.pgbouncer is not None:
        await engine.pgbouncer.close()
    if engine.proxy is not None:
        await engine.proxy.close()
    if engine.redis is not None:
        await engine.redis.close()
    if engine.mongo is not None:
        await engine.mongo.close()


@asynccontextmanager
async def open_engine(settings: EngineSettings, *, clock: Clock = utcnow) -> AsyncIterator[Engine]:
    engine = await start_engine(settings, clock=clock)
    try:
        yield engine
    finally:
        await close_engine(engine)
