"""A month's figures, read once for the usage report and the billing close: the declared
tenants, their tier history, the metered hours and the cost model in force.

Both price the month with ``dynabase.desired.charges.price_month`` on what one
``MonthReader`` returns, so a report and an invoice of the same month agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import yaml
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.desired.charges import MonthPricing, month_bounds, month_hours, price_month
from dynabase.desired.cost import FittedModel, model_from_document
from dynabase.desired.mongo import rollup
from dynabase.engine.reconciler import Engine
from dynabase.kubeapi import KubeApi
from dynabase.spec import GROUP, VERSION, TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.documents import load_paths

Declared = tuple[dict[str, TierPolicy], list[TenantDatabase]]


class Statuses(Protocol):
    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]: ...


class Rollups(Protocol):
    name: str

    async def read(self, hours: range) -> list[dict[str, Any]]: ...


class MongoRollups:
    """The engine's hourly copy in MongoDB's tenantUsage."""

    name = "mongo"

    def __init__(self, mongo: MongoBackend) -> None:
        self.mongo = mongo

    async def read(self, hours: range) -> list[dict[str, Any]]:
        try:
            return await self.mongo.read_usage(hours)
        except PyMongoError as exc:
            raise ConnectionError(f"cannot read tenantUsage from MongoDB: {exc}") from None


class RedisRollups:
    """Straight from the proxies' hourly Redis hashes."""

    name = "redis"

    def __init__(self, proxy: ProxyBackend) -> None:
        self.proxy = proxy

    async def read(self, hours: range) -> list[dict[str, Any]]:
        try:
            by_hour = await self.proxy.usage_fields_for_hours(hours)
        except RedisError as exc:
            raise ConnectionError(f"cannot read usage from Redis: {exc}") from None
        return [doc for hour, fields in by_hour.items() for doc in rollup(hour, fields).values()]


def load_model_file(path: Path) -> FittedModel:
    """A model document (bench.attribution's output, a ConfigMap's data) as an unstored version."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the model: {exc}") from None
    model, factors = model_from_document(raw, str(path))
    return FittedModel(model, factors, 0, f"file {path}")


@dataclass
class MonthReader:
    usage: Rollups
    statuses: Statuses | None = None  # None: no status store, tiers from the counters and declarations
    models: PostgresCostModels | None = None  # None: the built-in defaults
    model_file: FittedModel | None = None  # instead of the stored version (import, what-if)

    async def model_for(self, month: str) -> FittedModel:
        if self.model_file is not None:
            return self.model_file
        if self.models is None:
            return FittedModel()
        return await self.models.in_force(month_bounds(month)[1])

    async def price(self, month: str, policies: Mapping[str, TierPolicy],
                    tenants: Sequence[TenantDatabase]) -> MonthPricing:
        docs = await self.usage.read(month_hours(month))
        keys = sorted({t.key for t in tenants} | {str(doc["tenant"]) for doc in docs})
        statuses = await self.statuses.load(keys) if self.statuses is not None else {}
        return price_month(month, policies, tenants, statuses, docs, await self.model_for(month), self.usage.name)


def month_reader_of(engine: Engine) -> MonthReader | None:
    """Headless mode: the engine's open backends (None without a usage source)."""
    usage: Rollups | None = MongoRollups(engine.mongo) if engine.mongo is not None else (
        RedisRollups(engine.proxy) if engine.proxy is not None else None)
    if usage is None:
        return None
    return MonthReader(usage, engine.status_store, engine.cost_models)


@contextlib.asynccontextmanager
async def open_month_reader(*, postgres_dsn: str | None, mongo_url: str | None, redis_url: str | None,
                            model_path: Path | None = None) -> AsyncIterator[MonthReader]:
    """A reader for one command: usage from MongoDB when configured, else Redis; status and
    the stored model from Postgres when a DSN is given."""
    model_file = load_model_file(model_path) if model_path is not None else None
    if not mongo_url and not redis_url:
        raise ValueError("set DYNABASE_MONGO_URL or DYNABASE_REDIS_URL: where the usage is")
    async with contextlib.AsyncExitStack() as stack:
        usage: Rollups
        if mongo_url:
            mongo = MongoBackend(mongo_url)
            stack.push_async_callback(mongo.close)
            usage = MongoRollups(mongo)
        else:
            assert redis_url is not None
            proxy = ProxyBackend(redis_url)
            stack.push_async_callback(proxy.close)
            usage = RedisRollups(proxy)
        reader = MonthReader(usage, model_file=model_file)
        if postgres_dsn:
            try:
                pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
            except (OSError, asyncpg.PostgresError) as exc:
                raise ConnectionError(f"cannot reach Postgres: {exc}") from None
            stack.push_async_callback(pool.close)
            reader.statuses, reader.models = PostgresStatusStore(pool), PostgresCostModels(pool)
        yield reader


def load_declared(paths: Sequence[str]) -> Declared:
    """TierPolicies and TenantDatabases from manifest files or folders; ValueError lists the errors."""
    loaded = load_paths(paths)
    if loaded.errors:
        raise ValueError("\n".join(str(error) for error in loaded.errors))
    policies = {d.resource.name: d.resource for d in loaded.documents if isinstance(d.resource, TierPolicy)}
    tenants = [d.resource for d in loaded.documents if isinstance(d.resource, TenantDatabase)]
    if not policies:
        raise ValueError("no TierPolicy in the manifests given: prices come from the tiers' billing sections")
    return policies, tenants


async def load_declared_from_kube(namespaces: Sequence[str]) -> Declared:
    """The cluster's TierPolicies and TenantDatabases, with their status (tier history)."""
    async with KubeApi(connections=2) as api:
        raw_policies = await api.list_objects(GROUP, VERSION, "tierpolicies")
        raw_tenants = await api.list_objects(GROUP, VERSION, "tenantdatabases", namespaces)
    policies = {p.name: p for p in (TierPolicy.model_validate(item) for item in raw_policies)}
    if not policies:
        raise ValueError("no TierPolicy in the cluster: prices come from the tiers' billing sections")
    return policies, [TenantDatabase.model_validate(item) for item in raw_tenants]
