"""Building an engine from settings, for the CLI and headless mode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import asyncpg

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.railway import RailwayBackend
from dynabase.backends.railway.client import DEFAULT_URL as RAILWAY_URL
from dynabase.backends.redis_acl import RedisBackend
from dynabase.backends.secrets_pg import KEY_VARIABLE, PostgresSecretStore, SecretsKeyring
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.desired.pg_hba import ALLOWED_VARIABLE, AllowedSources
from dynabase.desired.railway import ServiceRef, ServiceTarget
from dynabase.settings import SettingsError, data_dir, env_int, env_str, from_env, secret_from_env

from .reconciler import Clock, Engine, utcnow
from .stores import DirectorySecretStore, EnvironmentPasswords, SecretStore, StatusStore

log = logging.getLogger(__name__)


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
        return cls(
            token, "account" if account else "project",
            url=env_str("DYNABASE_RAILWAY_URL", RAILWAY_URL) or RAILWAY_URL,
            hourly_budget=env_int("DYNABASE_RAILWAY_HOURLY_BUDGET", 1000, minimum=1),
            pg_host=env_str("DYNABASE_RAILWAY_PGHOST"),
            pg_port=env_int("DYNABASE_RAILWAY_PGPORT", 0, minimum=0, maximum=65535) or None,
            proxy_service=from_env("DYNABASE_RAILWAY_PROXY_SERVICE", _service_ref, None,
                                   example="projectId/environmentId/proxy"),
            proxy_replicas=env_int("DYNABASE_RAILWAY_PROXY_REPLICAS", 2, minimum=0),
        )

    def platform_targets(self) -> list[ServiceTarget]:
        if self.proxy_service is None:
            return []
        return [ServiceTarget("platform/proxy", self.proxy_service, self.proxy_replicas, sleep_application=False)]


def _service_ref(text: str) -> ServiceRef:
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError("expected projectId/environmentId/serviceName")
    return ServiceRef(*parts)


SecretsStoreKind = Literal["postgres", "files"]

NO_SECRETS_KEY = (
    "tenant passwords need a home that every replica and every redeploy finds. Set DYNABASE_SECRETS_KEY "
    "(or DYNABASE_SECRETS_KEY_FILE) to 32 random bytes in base64 (`openssl rand -base64 32`) to keep them in "
    "Postgres, encrypted; or, for a single replica with a persistent volume, DYNABASE_SECRETS_STORE=files "
    "and DYNABASE_SECRETS_DIR on that volume"
)


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
    secrets_store: SecretsStoreKind = "files"
    secrets_keyring: SecretsKeyring | None = None  # the postgres store's keys
    read_only: bool = False  # `dynabase plan`: stores write nothing either
    # Where tenant roles may log in to Postgres from (DirectAccess); None: pg_hba.conf is not judged.
    postgres_allowed_sources: AllowedSources | None = field(default_factory=AllowedSources)

    @classmethod
    def from_env(cls, *, postgres_dsn: str | None = None, secrets_dir: str | None = None,
                 secrets_store: str | None = None, concurrency: int | None = None, redis_url: str | None = None,
                 headless: bool = False) -> EngineSettings:
        """Flags given here win over their variables. ``headless`` refuses to keep passwords in
        files nobody chose: a replica or a redeploy would not find them."""
        dsn = postgres_dsn or env_str("DYNABASE_POSTGRES_DSN")
        if not dsn:
            raise SettingsError(
                "no Postgres to reconcile: pass --postgres-dsn or set DYNABASE_POSTGRES_DSN "
                "(`eval \"$(dynabase devstack env)\"` sets it for the local stack)"
            )
        directory = secrets_dir or env_str("DYNABASE_SECRETS_DIR")
        store, keyring = _secrets_store(secrets_store, chosen_dir=directory is not None, headless=headless)
        redis = redis_url or env_str("DYNABASE_REDIS_URL")
        return cls(
            dsn, Path(directory) if directory else data_dir() / "secrets",
            concurrency or env_int("DYNABASE_CONCURRENCY", 8, minimum=1),
            redis_url=redis, tenant_redis_url=env_str("DYNABASE_TENANT_REDIS_URL") or redis,
            mongo_url=env_str("DYNABASE_MONGO_URL"), railway=RailwaySettings.from_env(),
            secrets_store=store, secrets_keyring=keyring,
            postgres_allowed_sources=from_env(ALLOWED_VARIABLE, AllowedSources.from_setting,
                                              cast(AllowedSources | None, AllowedSources()),
                                              example="local,10.0.0.0/8"),
        )


def _secrets_store(flag: str | None, *, chosen_dir: bool,
                   headless: bool) -> tuple[SecretsStoreKind, SecretsKeyring | None]:
    """Postgres when a key is set; files when chosen (or for one-off commands); else, in headless mode, refuse."""
    raw_key = secret_from_env(KEY_VARIABLE)
    keyring = SecretsKeyring.parse(raw_key) if raw_key else None
    chosen = flag or from_env("DYNABASE_SECRETS_STORE", _store_kind, None, example="postgres")
    if chosen == "postgres" and keyring is None:
        raise SettingsError("DYNABASE_SECRETS_STORE=postgres needs DYNABASE_SECRETS_KEY: " + NO_SECRETS_KEY)
    if chosen is None:
        if keyring is None and headless and not chosen_dir:
            raise SettingsError(NO_SECRETS_KEY)
        chosen = "postgres" if keyring is not None else "files"
    return _store_kind(chosen), keyring


def _store_kind(text: str) -> SecretsStoreKind:
    if text == "postgres":
        return "postgres"
    if text == "files":
        return "files"
    raise ValueError("expected postgres or files")


def secret_store(settings: EngineSettings, pool: asyncpg.Pool) -> SecretStore:
    """Variables first (DYNABASE_PASSWORD_<NAMESPACE>__<NAME>), then the chosen store."""
    if settings.secrets_store == "postgres":
        assert settings.secrets_keyring is not None
        return EnvironmentPasswords(PostgresSecretStore(pool, settings.secrets_keyring, reseal=not settings.read_only))
    if not settings.read_only:
        log.warning("tenant passwords kept in files: only this replica and this filesystem know them",
                    extra={"directory": str(settings.secrets_dir)})
    return EnvironmentPasswords(DirectorySecretStore(settings.secrets_dir))


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
        secrets=secrets or secret_store(settings, postgres.pool),
        status_store=status_store or PostgresStatusStore(postgres.pool),
        clock=clock,
        concurrency=settings.concurrency,
        cost_models=PostgresCostModels(postgres.pool),
        postgres_allowed_sources=settings.postgres_allowed_sources,
    )


async def close_engine(engine: Engine) -> None:
    await engine.warm_pool.close()
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
    engine.warm_pool.refill = False  # a one-off command claims; the long-running engines refill
    try:
        yield engine
    finally:
        await close_engine(engine)
