"""Building an engine from settings, for the CLI and headless mode."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.railway import RailwayBackend
from dynabase.backends.railway.client import DEFAULT_URL as RAILWAY_URL
from dynabase.backends.redis_acl import RedisBackend
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.desired.railway import ServiceRef, ServiceTarget

from .reconciler import Clock, Engine, utcnow
from .stores import DirectorySecretStore, SecretStore, StatusStore


class SettingsError(ValueError):
    pass


def secret_from_env(name: str) -> str | None:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE`` (mounted secrets, Railway variables)."""
    value = os.environ.get(name)
    if value:
        return value.strip()
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from None
    return None


@dataclass(frozen=True)
class RailwaySettings:
    token: str = field(repr=False)
    token_kind: str  # "account" (Authorization: Bearer) or "project" (Project-Access-Token)
    url: str = RAILWAY_URL
    hourly_budget: int = 1000
    pg_host: str | None = None  # what tenant services get as PGHOST/PGPORT: the proxy's address
    pg_port: int | None = None
    proxy_service: ServiceRef | None = None  # the platform's proxy service and its replica count
    proxy_replicas: int = 2

    @classmethod
    def from_env(cls) -> RailwaySettings | None:
        account, project = secret_from_env("DYNABASE_RAILWAY_TOKEN"), secret_from_env("DYNABASE_RAILWAY_PROJECT_TOKEN")
        if account and project:
            raise SettingsError("set one of DYNABASE_RAILWAY_TOKEN (account/workspace token) and "
                                "DYNABASE_RAILWAY_PROJECT_TOKEN (project token), not both")
        token = account or project
        if not token:
            return None
        proxy = os.environ.get("DYNABASE_RAILWAY_PROXY_SERVICE")  # projectId/environmentId/serviceName
        proxy_ref = None
        if proxy:
            parts = proxy.split("/")
            if len(parts) != 3 or not all(parts):
                raise SettingsError(f"DYNABASE_RAILWAY_PROXY_SERVICE={proxy!r}: expected "
                                    "projectId/environmentId/serviceName")
            proxy_ref = ServiceRef(*parts)
        return cls(
            token, "account" if account else "project",
            url=os.environ.get("DYNABASE_RAILWAY_URL", RAILWAY_URL),
            hourly_budget=_int_env("DYNABASE_RAILWAY_HOURLY_BUDGET", 1000),
            pg_host=os.environ.get("DYNABASE_RAILWAY_PGHOST"),
            pg_port=_int_env("DYNABASE_RAILWAY_PGPORT", 0) or None,
            proxy_service=proxy_ref,
            proxy_replicas=_int_env("DYNABASE_RAILWAY_PROXY_REPLICAS", 2),
        )

    def platform_targets(self) -> list[ServiceTarget]:
        if self.proxy_service is None:
            return []
        return [ServiceTarget("platform/proxy", self.proxy_service, self.proxy_replicas, sleep_application=False)]


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a whole number") from None


@dataclass(frozen=True)
class EngineSettings:
    postgres_dsn: str
    secrets_dir: Path
    concurrency: int = 8
    redis_url: str | None = None  # where the PgBouncer layout is published; None = no PgBouncer
    # The Redis that tenants use (ACL users, quotas); by default the same one.
    tenant_redis_url: str | None = None
    mongo_url: str | None = None  # tenant users and the organizations/tenantUsage collections
    railway: RailwaySettings | None = None

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
            railway=RailwaySettings.from_env(),
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
    railway = settings.railway
    return Engine(
        railway=RailwayBackend.from_settings(railway.token, railway.token_kind, railway.url, railway.hourly_budget)
        if railway else None,
        railway_platform=railway.platform_targets() if railway else (),
        railway_pg_host=railway.pg_host if railway else None,
        railway_pg_port=railway.pg_port if railway else None,
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
    if engine.railway is not None:
        await engine.railway.close()


@asynccontextmanager
async def open_engine(settings: EngineSettings, *, clock: Clock = utcnow) -> AsyncIterator[Engine]:
    engine = await start_engine(settings, clock=clock)
    try:
        yield engine
    finally:
        await close_engine(engine)
