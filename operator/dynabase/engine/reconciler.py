"""The reconcile engine shared by the operator, headless mode and the CLI.

One pass: resolve every tenant's tier (pure), judge idleness and usage, then
run the backend passes in ``passes.order.ORDER`` (each observes its backend
once for all tenants, plans per tenant, applies with bounded concurrency),
then record status. A failure in one tenant or backend becomes that condition;
it never stops the others, and the next pass converges. ``dynabase plan`` is
the same pass as a dry run: observe and plan, apply and record nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.railway import RailwayBackend
from dynabase.backends.redis_acl import RedisBackend
from dynabase.backends.warm_pool import WarmPoolStore
from dynabase.desired.cost import FittedModel
from dynabase.desired.pg_hba import AllowedSources
from dynabase.desired.railway import ServiceTarget
from dynabase.desired.warm_pool import pool_sizes
from dynabase.spec import TenantDatabase, TierPolicy

from . import metrics, status
from .cold import mark_cold
from .failures import describe_error, with_retries
from .passes.base import BackendPass, PassRun
from .passes.mongo import MongoPass, UserCheckRotation
from .passes.order import run_in_order
from .passes.pgbouncer import PgBouncerPass
from .passes.postgres import PostgresPass
from .passes.proxy import ProxyPass
from .passes.railway import PlatformSchedule, RailwayPass
from .passes.redis import RedisPass
from .passwords import load_passwords
from .results import PassResult, TenantResult
from .status import HISTORY_LIMIT
from .stores import SecretStore, StatusStore
from .tiers import resolve
from .usage import MonthUsage, UsageRollup, judge_usage
from .warm_pool import WarmPoolFiller

__all__ = ["HISTORY_LIMIT", "Clock", "Engine", "PassResult", "TenantResult", "describe_error", "utcnow",
           "with_retries"]

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Engine:
    PLATFORM_INTERVAL = 300.0  # partial passes (the operator's batches) look at platform services this often

    def __init__(
        self,
        *,
        postgres: PostgresBackend,
        secrets: SecretStore,
        status_store: StatusStore,
        clock: Clock = utcnow,
        concurrency: int = 8,
        pgbouncer: PgBouncerBackend | None = None,
        proxy: ProxyBackend | None = None,
        redis: RedisBackend | None = None,
        mongo: MongoBackend | None = None,
        railway: RailwayBackend | None = None,
        railway_platform: Sequence[ServiceTarget] = (),
        railway_pg_host: str | None = None,
        railway_pg_port: int | None = None,
        cost_models: PostgresCostModels | None = None,
        postgres_allowed_sources: AllowedSources | None = None,
    ) -> None:
        self.postgres = postgres
        self.secrets = secrets
        self.status_store = status_store
        self.clock = clock
        self.concurrency = concurrency
        self.pgbouncer = pgbouncer
        self.proxy = proxy
        self.redis = redis
        self.mongo = mongo
        self.railway = railway
        # The platform's own services (the proxy), managed like a tenant's but owned by no tenant.
        self.railway_platform = list(railway_platform)
        self.railway_pg_host, self.railway_pg_port = railway_pg_host, railway_pg_port
        # Proxy usage -> vCPU-hours: the stored version in force (the report and billing read the same).
        self.cost_models = cost_models
        self.cost_model = FittedModel()
        # Where tenant roles may log in to Postgres from; each tenant's DirectAccess says if pg_hba.conf agrees.
        self.postgres_allowed_sources = postgres_allowed_sources
        self.mongo_checks_per_pass = 100
        # What outlives one pass; each is defined and used by the one module that needs it.
        self._month_usage = MonthUsage()
        self._rollup = UsageRollup()
        self._platform = PlatformSchedule()
        self._mongo_rotation = UserCheckRotation()
        self._layout_lock = asyncio.Lock()
        self._bootstrapped = False
        self._bootstrap_lock = asyncio.Lock()
        # Databases made ahead of sign-ups, refilled beside the passes (runtime.close_engine stops it).
        self.warm_pool = WarmPoolFiller(WarmPoolStore(postgres.dsn))

    @property
    def platform_plans(self) -> list[str]:
        """What the last look at the platform's services would change."""
        return self._platform.plans

    async def bootstrap(self) -> None:
        async with self._bootstrap_lock:  # concurrent first passes must not race on CREATE
            if not self._bootstrapped:
                await with_retries(self.postgres.bootstrap)
                self._bootstrapped = True

    async def keep_warm(self, policies: dict[str, TierPolicy]) -> None:
        """Start (or resize) the warm pools the policies declare, before any tenant's pass needs them."""
        sizes = pool_sizes(policies)
        if any(sizes.values()):
            await self.bootstrap()  # pool databases are copies of the bootstrapped template
        self.warm_pool.want(sizes)

    async def reconcile_all(
        self,
        policies: dict[str, TierPolicy],
        tenants: Sequence[TenantDatabase],
        *,
        dry_run: bool = False,
        deleted: Sequence[TenantDatabase] = (),
        complete: bool = False,
        unusable_policies: Mapping[str, str] | None = None,
    ) -> PassResult:
        """Reconcile ``tenants`` (and remove ``deleted``).

        ``complete`` says the tenants are *all* tenants (headless, CLI): shared
        state such as the PgBouncer layout is then rebuilt instead of patched.
        ``unusable_policies`` are declared policies the engine cannot use, with why.
        """
        started = time.monotonic()
        writes_before = self.postgres.counter.writes
        now = self.clock()
        if not dry_run:
            await self.bootstrap()
            await self.keep_warm(policies)
        statuses = await self.status_store.load([t.key for t in [*tenants, *deleted]])
        results = [resolve(t, policies, statuses.get(t.key), now, unusable_policies) for t in tenants]
        await mark_cold(self.proxy, results, statuses, now)
        self.cost_model = await judge_usage(self.proxy, self._month_usage, self.cost_model, self.cost_models,
                                            results, statuses, now)
        deleted_results = [TenantResult(t) for t in deleted]
        await self._load_passwords(results)

        run = PassRun(results, deleted_results, policies, dry_run, complete, self.concurrency)
        await run_in_order(self._passes(run))

        everyone = run.everyone
        if not dry_run:
            await status.record_all(self.status_store, results, statuses, now, idle_tracked=self.proxy is not None)
            status.count_failures(everyone)
            for gone in deleted:
                metrics.forget_tenant(gone.key)
            metrics.STATEMENTS.inc(self.postgres.counter.writes - writes_before)
            if complete:
                status.update_gauges(results)
        seconds = time.monotonic() - started
        metrics.RECONCILE_SECONDS.labels("dry-run" if dry_run else ("all" if complete else "partial")).observe(seconds)
        return PassResult(everyone, seconds, self.postgres.counter.writes - writes_before)

    async def _load_passwords(self, results: list[TenantResult]) -> None:
        """Each resolved tenant's stored password (the Postgres pass generates missing ones)."""
        await load_passwords(self.secrets, [r for r in results if r.decision is not None])

    def _passes(self, run: PassRun) -> dict[str, BackendPass]:
        """This pass's backend passes, built from the backends configured now (tests swap them)."""
        passes: list[BackendPass] = [PostgresPass(run, self.postgres, self.secrets, self.postgres_allowed_sources)]
        if self.proxy is not None:
            passes.append(ProxyPass(run, self.proxy))
        if self.pgbouncer is not None:
            passes.append(PgBouncerPass(run, self.pgbouncer, self._layout_lock))
        if self.redis is not None:
            passes.append(RedisPass(run, self.redis))
        if self.mongo is not None:
            passes.append(MongoPass(run, self.mongo, self._mongo_rotation, self.mongo_checks_per_pass,
                                    after_apply=self._rollup_if_due))
        if self.railway is not None:
            passes.append(RailwayPass(
                run, self.railway, platform=self.railway_platform, schedule=self._platform,
                interval=self.PLATFORM_INTERVAL, pg_host=self.railway_pg_host, pg_port=self.railway_pg_port,
            ))
        return {p.backend: p for p in passes}

    async def _rollup_if_due(self) -> None:
        if self.proxy is not None and self._rollup.due():
            await self.rollup_usage()

    async def watch_wakes(self, on_wake: Callable[[str], None], stop: asyncio.Event) -> None:
        """Cold tenants woken by a connection at a proxy, as they happen (nothing without a proxy)."""
        if self.proxy is not None:
            await self.proxy.wakes(on_wake, stop)

    async def rollup_usage(self, hours: int = 2) -> int:
        """Copy the proxies' hourly usage into dynabase.tenantUsage (idempotent upserts)."""
        if self.mongo is None or self.proxy is None:
            return 0
        return await self._rollup.copy(self.proxy, self.mongo, hours)
