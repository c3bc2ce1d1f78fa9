"""Where the portal reads tenants, tiers and status, and the portal built for each mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from aiohttp import web

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.events_pg import PostgresEventLog
from dynabase.backends.portal_pg import PortalStore
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.documents import load_paths
from dynabase.usage.month import Rollups, load_declared, load_declared_from_kube, month_reader_of

from .app import Portal, portal_app
from .data import Declared
from .usage import MonthDocs

REFRESH_SECONDS = 30.0  # how stale the declarations may be (a new tenant can log in this much later)


class Cached:
    """The newest declarations, loaded at most every REFRESH_SECONDS (one load at a time)."""

    def __init__(self, load: Callable[[], Awaitable[Declared]]) -> None:
        self._load, self._lock = load, asyncio.Lock()
        self._value: Declared | None = None
        self._at = -1e18

    async def get(self) -> Declared:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= REFRESH_SECONDS:
                self._value, self._at = await self._load(), time.monotonic()
            return self._value


class HeadlessDeclarations:
    """Headless mode: the active replica's declarations; a standby reads the source itself."""

    def __init__(self, reconciler: HeadlessReconciler) -> None:
        self.reconciler = reconciler
        self._standby = Cached(self._from_source)

    async def _from_source(self) -> Declared:
        loaded = await asyncio.to_thread(lambda: load_paths([self.reconciler.source.checkout()]))
        return ({d.resource.name: d.resource for d in loaded.documents if isinstance(d.resource, TierPolicy)},
                [d.resource for d in loaded.documents if isinstance(d.resource, TenantDatabase)])

    async def declared(self) -> Declared:
        state = self.reconciler.state
        if state.passes > 0:
            return state.policies, list(state.tenants.values())
        return await self._standby.get()

    async def statuses(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        return await self.reconciler.engine.status_store.load(keys)


class ManifestDeclarations:
    """`dynabase portal --manifests`: the files, status from Postgres (headless mode's store)."""

    def __init__(self, paths: Sequence[str], pool: asyncpg.Pool) -> None:
        self._cached = Cached(lambda: asyncio.to_thread(load_declared, list(paths)))
        self._statuses = PostgresStatusStore(pool)

    async def declared(self) -> Declared:
        return await self._cached.get()

    async def statuses(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        return await self._statuses.load(keys)


class KubeDeclarations:
    """`dynabase portal --kube`: TenantDatabases and TierPolicies from the cluster, with their status."""

    def __init__(self, namespaces: Sequence[str]) -> None:
        self._cached = Cached(lambda: load_declared_from_kube(namespaces))

    async def declared(self) -> Declared:
        return await self._cached.get()

    async def statuses(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        _, tenants = await self._cached.get()
        return {t.key: t.status for t in tenants if t.key in keys and t.status is not None}


def headless_portal(reconciler: HeadlessReconciler) -> web.Application:
    """The portal on headless mode's port, on the engine's own connections."""
    engine = reconciler.engine
    pool = engine.postgres.pool
    reader = month_reader_of(engine)
    return portal_app(Portal(HeadlessDeclarations(reconciler), PortalStore(pool), PostgresEventLog(pool),
                             MonthDocs(reader.usage) if reader is not None else None,
                             engine.cost_models or PostgresCostModels(pool)))


def standalone_portal(declarations: ManifestDeclarations | KubeDeclarations, pool: asyncpg.Pool,
                      usage: Rollups | None) -> Portal:
    return Portal(declarations, PortalStore(pool), PostgresEventLog(pool),
                  MonthDocs(usage) if usage is not None else None, PostgresCostModels(pool))
