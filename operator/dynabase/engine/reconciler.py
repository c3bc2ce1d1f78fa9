"""The reconcile engine shared by the operator, headless mode and the CLI.

One pass: resolve every tenant's tier (pure), observe each backend once for all
tenants, plan per tenant (pure), apply per tenant with bounded concurrency,
then record status. A failure in one tenant or backend becomes that condition;
it never stops the others, and the next pass converges.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.mongo import MongoBackend
from dynabase.backends.pgbouncer import PgBouncerBackend, PgBouncerObserved
from dynabase.backends.postgres import PGBOUNCER_AUTH_ROLE, PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.railway import EnvironmentObserved, RailwayBackend
from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.cost import FittedModel, UsageTotals, usage_by_tenant
from dynabase.desired.effective import EffectiveLimits, ResolveError, find_policy, merge
from dynabase.desired.lifecycle import idle_message, is_cold
from dynabase.desired.mongo import org_changed, org_document, rollup
from dynabase.desired.overage import OverageVerdict, decide_overage, month_start
from dynabase.desired.pgbouncer import PgBouncerDesired, PoolSettings, TenantRoute, plan_lines, pool_name
from dynabase.desired.postgres import (
    Password,
    PostgresObserved,
    PostgresPlan,
    PostgresTarget,
    TenantState,
    plan_postgres,
    render_plan,
    role_settings,
)
from dynabase.desired.proxy import ProxyTenantLimits, proxy_limits
from dynabase.desired.proxy import plan_lines as proxy_plan_lines
from dynabase.desired.railway import ServicePlan, ServiceRef, ServiceTarget, plan_service, tenant_service_target
from dynabase.desired.redis import RedisTarget, acl_drift, acl_username, key_prefix, password_hash, quota_verdict
from dynabase.desired.transition import TierDecision, decide_tier
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.tenant import TierChange

from . import metrics
from .conditions import Outcome, build_conditions, make_condition
from .passwords import secret_failed, settle_passwords, stored_password
from .stores import SecretStore, StatusStore

log = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], dt.datetime]
HISTORY_LIMIT = 20


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class TenantResult:
    tenant: TenantDatabase
    decision: TierDecision | None = None
    error: ResolveError | None = None
    plans: dict[str, list[str]] = field(default_factory=dict)  # backend -> redacted lines
    outcomes: list[Outcome] = field(default_factory=list)
    status: TenantDatabaseStatus | None = None
    status_changed: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    password: Password | None = field(default=None, repr=False)
    cold: bool = False  # scaled to zero: idle past the tier's idleTimeout
    overage: OverageVerdict | None = None  # this month's usage against the included usage
    sessions_ended: int = 0

    @property
    def key(self) -> str:
        return self.tenant.key

    @property
    def limits_tier(self) -> str | None:
        return self.decision.applied_tier if self.decision else None

    @property
    def limits(self) -> EffectiveLimits | None:
        return self.decision.limits if self.decision else None

    @property
    def ready(self) -> bool:
        return self.error is None and all(o.ok or o.advisory for o in self.outcomes)

    @property
    def changes(self) -> bool:
        return any(self.plans.values())


@dataclass
class PassResult:
    tenants: list[TenantResult]
    seconds: float
    writes: int

    @property
    def changes(self) -> bool:
        return any(t.changes for t in self.tenants)

    def render(self) -> str:
        lines: list[str] = []
        for result in sorted(self.tenants, key=lambda r: r.key):
            head = f"{result.key} (database {result.tenant.database_name})"
            if result.error is not None:
                lines.append(f"{head}: ERROR {result.error.reason}: {result.error.message}")
                continue
            decision = result.decision
            assert decision is not None
            tier = decision.applied_tier
            if decision.pending_tier:
                when = decision.effective_at.isoformat() if decision.effective_at else "?"
                tier += f" (downgrade to {decision.pending_tier} pending until {when})"
            if not result.changes:
                lines.append(f"{head}: tier {tier}: no changes")
                continue
            lines.append(f"{head}: tier {tier}:")
            for backend, backend_lines in result.plans.items():
                for line in backend_lines:
                    lines.append(f"  {backend}: {line}")
        return "\n".join(lines)


_TRANSIENT = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
              asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


async def with_retries(fn: Callable[[], Awaitable[T]], *, attempts: int = 3, base_delay: float = 0.2) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except _TRANSIENT:
            if attempt == attempts:
                raise
            await asyncio.sleep(base_delay * 2 ** (attempt - 1) * (1 + random.random() / 2))
    raise AssertionError("unreachable")


@dataclass
class _ProxyState:
    observed: dict[str, ProxyTenantLimits]
    targets: dict[str, tuple[TenantResult, ProxyTenantLimits]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


def _lowers_proxy(before: ProxyTenantLimits | None, after: ProxyTenantLimits) -> bool:
    if before is None:
        return False
    def qps(v: int | None) -> float:
        return float("inf") if v is None else v
    return after.max_connections < before.max_connections or qps(after.qps) < qps(before.qps)


def _lowers_connections(target: PostgresTarget, observed: PostgresObserved) -> bool:
    role = observed.roles.get(target.role)
    if role is None or target.state != "active":
        return False
    have, want = role.connection_limit, target.connection_limit
    return want >= 0 and (have < 0 or want < have)


def describe_error(exc: BaseException) -> str:
    """Error text for conditions: the driver's message, never the statement (it may hold a verifier)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
    return f"{type(exc).__name__}: {exc}"


class Engine:
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
        self.platform_plans: list[str] = []
        # Proxy usage -> vCPU-hours: the stored version in force (the report and billing read the same).
        self.cost_models = cost_models
        self.cost_model = FittedModel()
        self._usage_month = -1
        self._usage_final_through = -1
        self._usage_final: dict[str, UsageTotals] = {}
        self._platform_checked = -1e9
        self._last_rollup = 0.0
        self._mongo_cursor = 0
        self.mongo_checks_per_pass = 100
        self._bootstrapped = False
        # Partial passes patch the shared PgBouncer layout: read-modify-write under a lock.
        self._layout_lock = asyncio.Lock()
        self._bootstrap_lock = asyncio.Lock()

    async def bootstrap(self) -> None:
        async with self._bootstrap_lock:  # concurrent first passes must not race on CREATE
            if not self._bootstrapped:
                await with_retries(self.postgres.bootstrap)
                self._bootstrapped = True

    # -- one pass ---------------------------------------------------------------

    async def reconcile_all(
        self,
        policies: dict[str, TierPolicy],
        tenants: Sequence[TenantDatabase],
        *,
        dry_run: bool = False,
        deleted: Sequence[TenantDatabase] = (),
        complete: bool = False,
    ) -> PassResult:
        """Reconcile ``tenants`` (and remove ``deleted``).

        ``complete`` says the tenants are *all* tenants (headless, CLI): shared
        state such as the PgBouncer layout is then rebuilt instead of patched.
        """
        started = time.monotonic()
        writes_before = self.postgres.counter.writes
        now = self.clock()
        if not dry_run:
            await self.bootstrap()
        statuses = await self.status_store.load([t.key for t in [*tenants, *deleted]])
        results = [self._resolve(t, policies, statuses.get(t.key), now) for t in tenants]
        await self._mark_cold(results, statuses, now)
        await self._judge_usage(results, statuses, now)
        deleted_results = [TenantResult(t) for t in deleted]

        targets: dict[str, PostgresTarget] = {}
        for result in results:
            if result.decision is not None:
                targets[result.key] = await self._postgres_target(result)
                result.password = targets[result.key].password
        for result in deleted_results:
            targets[result.key] = self._deletion_target(result.tenant)

        try:
            observed = await with_retries(
                lambda: self.postgres.observe(
                    [t.role for t in targets.values()], [t.database for t in targets.values()]
                )
            )
        except Exception as exc:  # any failure here is this backend's condition
            log.warning("postgres observe failed", extra={"error": describe_error(exc)})
            for result in [*results, *deleted_results]:
                result.outcomes.append(Outcome("PostgresReady", False, "ObserveFailed", describe_error(exc)))
            observed = None
        if observed is not None:  # a role that has a password never gets a generated one
            await settle_passwords(self.secrets, results, targets, observed, dry_run)

        everyone = [*results, *deleted_results]
        proxy_state = await self._proxy_prepare(results, deleted_results, dry_run) if self.proxy else None
        if proxy_state is not None and not dry_run:
            # Limits fall at the proxy first (and deleted tenants leave it first).
            await self._proxy_apply(proxy_state, lowering=True)
        if observed is not None:
            plans = self._postgres_plans(everyone, targets, observed)
            # Limits rise in Postgres before the pools grow, and fall after the pools shrink,
            # so PgBouncer never holds more server connections than the role may open.
            falling = {k for k, t in targets.items() if _lowers_connections(t, observed)}
            if not dry_run:
                await self._postgres_apply([r for r in everyone if r.key not in falling], plans)
        if self.pgbouncer is not None:
            await self._pgbouncer_pass(results, deleted_results, policies, dry_run, complete)
        if observed is not None and not dry_run:
            await self._postgres_apply([r for r in everyone if r.key in falling], plans)
        if self.redis is not None:
            await self._redis_pass(results, deleted_results, dry_run)
        if self.mongo is not None:
            await self._mongo_pass(results, deleted_results, policies, dry_run)
        if self.railway is not None:
            await self._railway_pass(results, dry_run, complete)
        if proxy_state is not None and not dry_run:
            # ... and rise there last, once the backends behind it can take the load.
            await self._proxy_apply(proxy_state, lowering=False)

        if not dry_run:
            # Status writes may be API calls (the operator): a few at a time, not one by one.
            writers = asyncio.Semaphore(16)

            async def record(result: TenantResult) -> None:
                previous = statuses.get(result.key)
                self._count_drift(result, previous)
                async with writers:
                    await self._record_status(result, previous, now)

            await asyncio.gather(*(record(r) for r in results))
            for result in everyone:
                for outcome in result.outcomes:
                    if not outcome.ok:
                        metrics.BACKEND_ERRORS.labels(metrics.backend_of(outcome.condition_type), outcome.reason).inc()
            metrics.STATEMENTS.inc(self.postgres.counter.writes - writes_before)
            if complete:
                self._update_gauges(results)
        seconds = time.monotonic() - started
        metrics.RECONCILE_SECONDS.labels("dry-run" if dry_run else ("all" if complete else "partial")).observe(seconds)
        return PassResult(everyone, seconds, self.postgres.counter.writes - writes_before)

    @staticmethod
    def _count_drift(result: TenantResult, previous: TenantDatabaseStatus | None) -> None:
        """A change with an unchanged declaration that was already Ready means someone drifted it."""
        if previous is None or previous.observed_generation != result.tenant.metadata.generation:
            return
        ready = previous.condition("Ready")
        if ready is None or ready.status != "True" or previous.applied_tier != result.limits_tier:
            return
        if (previous.phase == "Cold") != result.cold:
            return  # going Cold or waking changes backends on purpose
        for backend, lines in result.plans.items():
            if lines:
                metrics.DRIFT_CORRECTIONS.labels(backend).inc()

    @staticmethod
    def _update_gauges(results: list[TenantResult]) -> None:
        counts: Tally[tuple[str, str]] = Tally()
        pending = 0
        for result in results:
            status = result.status
            if status is None:
                continue
            counts[(status.applied_tier or "none", status.phase)] += 1
            pending += status.pending_tier is not None
        metrics.set_tenant_gauges(counts, pending)

    def _resolve(
        self, tenant: TenantDatabase, policies: dict[str, TierPolicy],
        previous: TenantDatabaseStatus | None, now: dt.datetime,
    ) -> TenantResult:
        result = TenantResult(tenant)
        try:
            policy = find_policy(tenant, policies)
            result.decision = decide_tier(
                tenant, policy,
                applied_tier=previous.applied_tier if previous else None,
                pending_tier=previous.pending_tier if previous else None,
                effective_at=previous.effective_at if previous else None,
                now=now,
            )
        except ResolveError as exc:
            result.error = exc
        return result

    async def _mark_cold(self, results: list[TenantResult], statuses: dict[str, TenantDatabaseStatus],
                         now: dt.datetime) -> None:
        """Which tenants are idle past their tier's idleTimeout (scale to zero)."""
        candidates = [r for r in results if r.limits is not None and r.limits.lifecycle.idle_timeout is not None
                      and not r.tenant.spec.suspended]
        if not candidates or self.proxy is None:
            return  # activity comes from the proxy; without it nobody is judged idle
        try:
            activity = await self.proxy.activity([r.tenant.database_name for r in candidates])
        except Exception as exc:  # unknown activity: nobody goes Cold this pass
            log.warning("proxy activity unavailable", extra={"error": describe_error(exc)})
            return
        for result in candidates:
            assert result.limits is not None
            previous = statuses.get(result.key)
            epoch = activity.get(result.tenant.database_name)
            last_query = dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else None
            since = previous.history[-1].at if previous and previous.history else None
            result.cold = is_cold(result.limits.lifecycle.idle_timeout, last_query, since, now)

    async def _judge_usage(self, results: list[TenantResult], statuses: dict[str, TenantDatabaseStatus],
                           now: dt.datetime) -> None:
        """Month-to-date usage (the proxies' metering, estimated as vCPU-hours) against each tier."""
        candidates = [r for r in results if r.limits is not None and r.limits.billing.included_vcpu_hours > 0]
        if not candidates or self.proxy is None:
            return
        try:
            usage = await self._month_usage(now)
            if self.cost_models is not None:
                self.cost_model = await self.cost_models.current()
        except Exception as exc:  # unknown usage: verdicts stay as they were
            log.warning("proxy usage unavailable", extra={"error": describe_error(exc)})
            return
        for result in candidates:
            assert result.limits is not None
            used = self.cost_model.vcpu_hours(result.key, usage.get(result.key, UsageTotals()))
            previous = statuses.get(result.key)
            result.overage = decide_overage(result.limits.billing, used, previous.usage if previous else None, now)
            metrics.set_usage_ratio(result.key, result.limits.tier,
                                    round(result.overage.ratio, 4) if result.overage is not None else None)

    async def _month_usage(self, now: dt.datetime) -> dict[str, UsageTotals]:
        """Month-to-date usage per tenant. Hours before the previous one no longer change: they are
        read and summed once, so a pass reads and parses only the last two hours."""
        assert self.proxy is not None
        first, current = int(month_start(now).timestamp()) // 3600, int(now.timestamp()) // 3600
        if self._usage_month != first:
            self._usage_month, self._usage_final_through, self._usage_final = first, first - 1, {}
        final_hours = list(range(self._usage_final_through + 1, current - 1))
        recent_hours = list(range(max(first, current - 1), current + 1))
        fetched = await self.proxy.usage_hours(final_hours + recent_hours)

        def totals(hours: list[int]) -> dict[str, UsageTotals]:
            docs = [doc for hour in hours for doc in rollup(hour, fetched[hour]).values()]
            return {tenant: value for tenant, (value, _tier) in usage_by_tenant(docs).items()}
        for tenant, value in totals(final_hours).items():
            self._usage_final[tenant] = self._usage_final.get(tenant, UsageTotals()) + value
        if final_hours:
            self._usage_final_through = final_hours[-1]
        month = dict(self._usage_final)
        for tenant, value in totals(recent_hours).items():
            month[tenant] = month.get(tenant, UsageTotals()) + value
        return month

    async def _postgres_target(self, result: TenantResult) -> PostgresTarget:
        tenant, limits = result.tenant, result.limits
        assert limits is not None
        state: TenantState = "suspended" if tenant.spec.suspended else "active"
        settings = role_settings(limits.postgres)
        if result.overage is not None and result.overage.restriction == "readOnly":
            settings["default_transaction_read_only"] = "on"
        return PostgresTarget(
            key=tenant.key,
            role=tenant.database_name,
            database=tenant.database_name,
            state=state,
            connection_limit=limits.postgres.connection_limit,
            settings=settings,
            password=await stored_password(self.secrets, result),
            service_roles=(PGBOUNCER_AUTH_ROLE,),
            cold_after_seconds=(limits.lifecycle.idle_timeout.milliseconds // 1000
                                if result.cold and limits.lifecycle.idle_timeout else None),
        )

    @staticmethod
    def _deletion_target(tenant: TenantDatabase) -> PostgresTarget:
        state: TenantState = "deleted" if tenant.spec.deletion_policy == "Delete" else "retained"
        return PostgresTarget(
            key=tenant.key, role=tenant.database_name, database=tenant.database_name, state=state,
            connection_limit=0, settings={}, service_roles=(PGBOUNCER_AUTH_ROLE,),
        )

    def _postgres_plans(
        self, results: list[TenantResult], targets: dict[str, PostgresTarget], observed: PostgresObserved
    ) -> dict[str, PostgresPlan]:
        plans: dict[str, PostgresPlan] = {k: plan_postgres(t, observed) for k, t in targets.items()}
        for result in results:
            plan = plans.get(result.key)
            if plan is None:
                continue
            result.plans["postgres"] = render_plan(plan)
            if targets[result.key].password is None and targets[result.key].state == "active" \
                    and not secret_failed(result):
                result.plans["postgres"].append("(a password would be generated into the tenant's Secret)")
        return plans

    async def _postgres_apply(self, results: list[TenantResult], plans: dict[str, PostgresPlan]) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)

        async def apply_one(result: TenantResult) -> None:
            plan = plans.get(result.key)
            if plan is None:
                return
            if plan.conflict:
                result.outcomes.append(Outcome("PostgresReady", False, "RoleConflict", plan.conflict))
                return
            async with semaphore:
                try:
                    ended = await with_retries(lambda: self.postgres.apply(plan))
                except Exception as exc:  # recorded as this tenant's condition
                    log.warning("postgres apply failed", extra={"tenant": result.key, "error": describe_error(exc)})
                    result.outcomes.append(Outcome("PostgresReady", False, "ApplyFailed", describe_error(exc)))
                    result.events.append(("Warning", "PostgresApplyFailed", describe_error(exc)))
                    return
            limits = result.limits
            message = (
                f"role {result.tenant.database_name}: connection limit {limits.postgres.connection_limit}"
                if limits else "removed"
            )
            result.outcomes.append(Outcome("PostgresReady", True, "Reconciled", message))
            if ended and limits is not None:
                result.sessions_ended = ended
                metrics.SESSIONS_ENDED.labels("cold" if result.cold else "over_limit").inc(ended)
                if not result.cold:
                    result.events.append(("Normal", "ConnectionsDrained", (
                        f"{ended} session(s) over the connection limit of {limits.postgres.connection_limit} "
                        f"(tier {limits.tier}) ended, idle ones first, then the newest")))

        await asyncio.gather(*(apply_one(r) for r in results if r.error is None))

    # -- Redis ------------------------------------------------------------------

    async def _redis_pass(self, results: list[TenantResult], deleted: list[TenantResult], dry_run: bool) -> None:
        backend = self.redis
        assert backend is not None
        active = [r for r in results if r.decision is not None and r.password is not None]
        try:
            backend.known_prefixes |= {key_prefix(r.tenant.database_name) for r in active}
            await backend.walk(sorted(backend.known_prefixes))
            names = [acl_username(r.tenant.database_name) for r in [*active, *deleted]]
            observed = await backend.observe(names)
            canonical = {ro: await backend.canonical_commands(ro) for ro in (False, True)}
        except Exception as exc:
            for result in active:
                result.outcomes.append(Outcome("RedisReady", False, "ObserveFailed", describe_error(exc)))
            return
        wrote = False
        for result in active:
            tenant, limits = result.tenant, result.limits
            assert limits is not None and result.password is not None
            keys, memory = backend.usage(key_prefix(tenant.database_name))
            verdict = quota_verdict(limits.redis, keys, memory)
            target = RedisTarget(tenant.key, tenant.database_name, password_hash(result.password.reveal()),
                                 read_only=verdict.over, enabled=not tenant.spec.suspended)
            before = observed.get(target.username)
            why = acl_drift(target, before, canonical[target.read_only])
            if why:
                result.plans["redis"] = [f"ACL SETUSER {target.username} ({'; '.join(why)})"]
            if dry_run:
                continue
            try:
                if why:
                    await backend.apply(target)
                    wrote = True
            except Exception as exc:
                result.outcomes.append(Outcome("RedisReady", False, "ApplyFailed", describe_error(exc)))
                continue
            was_read_only = before is not None and before.commands == canonical[True]
            if verdict.over:
                result.outcomes.append(Outcome("RedisReady", False, "QuotaExceeded", verdict.message))
                if not was_read_only:
                    metrics.REDIS_DEMOTIONS.inc()
                    result.events.append(("Warning", "RedisQuotaExceeded", f"writes refused: {verdict.message}"))
            else:
                result.outcomes.append(Outcome("RedisReady", True, "Reconciled", f"user {target.username}: "
                                               f"{verdict.message}"))
                if was_read_only:
                    result.events.append(("Normal", "RedisQuotaRestored", f"writes allowed again: {verdict.message}"))
        for result in deleted:
            tenant = result.tenant
            name = acl_username(tenant.database_name)
            if observed.get(name) is not None:
                result.plans["redis"] = [f"ACL DELUSER {name}"]
            if dry_run:
                continue
            try:
                if observed.get(name) is not None:
                    await backend.apply(RedisTarget(tenant.key, tenant.database_name, "", False, present=False))
                    wrote = True
                if tenant.spec.deletion_policy == "Delete":
                    await backend.drop_keys(key_prefix(tenant.database_name))
            except Exception as exc:
                result.outcomes.append(Outcome("RedisReady", False, "DeleteFailed", describe_error(exc)))
        if wrote:
            with contextlib.suppress(Exception):
                await backend.persist()

    # -- MongoDB ----------------------------------------------------------------

    async def _mongo_pass(self, results: list[TenantResult], deleted: list[TenantResult],
                          policies: dict[str, TierPolicy], dry_run: bool) -> None:
        backend = self.mongo
        assert backend is not None
        active = [r for r in results if r.decision is not None and r.password is not None]
        try:
            roles_supported = await backend.detect()
            orgs = await backend.orgs([r.key for r in [*active, *deleted]])
        except Exception as exc:
            for result in active:
                result.outcomes.append(Outcome("MongoReady", False, "ObserveFailed", describe_error(exc)))
            return
        # Checking a user costs a round trip per tenant database; beyond new or changed tenants,
        # a rotating slice is checked each pass (bounded work), so drift is found within a few passes.
        checked = {r.key for r in active if r.key not in orgs}
        if active:
            start = self._mongo_cursor % len(active)
            rotation = (active[start:] + active[:start])[: self.mongo_checks_per_pass]
            checked |= {r.key for r in rotation}
            self._mongo_cursor = start + len(rotation)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(result: TenantResult) -> None:
            tenant, limits = result.tenant, result.limits
            assert limits is not None and result.password is not None
            database = tenant.database_name
            roles = [{"role": "readWrite", "db": database}] if roles_supported else []
            policy = policies.get(tenant.spec.tier_policy_ref)
            doc = org_document(tenant.key, tenant.spec.org_id, database, limits, tenant.spec.tier_policy_ref,
                               policy.metadata.generation if policy else None)
            org_differs = org_changed(orgs.get(tenant.key), doc)
            if org_differs:
                result.plans.setdefault("mongo", []).append(f"upsert organizations/{tenant.key} (tier {limits.tier})")
            if dry_run:
                return
            try:
                async with semaphore:
                    if result.key in checked or org_differs:
                        current = await backend.user(database, database)
                        done = await backend.ensure_user(database, database, result.password.reveal(), roles,
                                                         current)
                        if done:
                            result.plans.setdefault("mongo", []).append(f"user {database}: {', '.join(done)}")
                    await backend.upsert_org(doc, orgs.get(tenant.key))
            except Exception as exc:
                result.outcomes.append(Outcome("MongoReady", False, "ApplyFailed", describe_error(exc)))
                return
            if roles_supported:
                result.outcomes.append(Outcome("MongoReady", True, "Reconciled", f"user {database}: readWrite"))
            else:
                result.outcomes.append(Outcome(
                    "MongoReady", False, "RolesUnsupported",
                    f"user {database} exists without roles: this server (FerretDB) has no authorization, "
                    "so any authenticated user can read other databases", advisory=True,
                ))

        await asyncio.gather(*(one(r) for r in active))
        for result in deleted:
            if dry_run:
                continue
            tenant = result.tenant
            try:
                await backend.drop_user(tenant.database_name, tenant.database_name,
                                        drop_database=tenant.spec.deletion_policy == "Delete")
                await backend.delete_org(tenant.key)
            except Exception as exc:
                result.outcomes.append(Outcome("MongoReady", False, "DeleteFailed", describe_error(exc)))
        if not dry_run and self.proxy is not None and time.monotonic() - self._last_rollup > 60:
            await self.rollup_usage()

    async def watch_wakes(self, on_wake: Callable[[str], None], stop: asyncio.Event) -> None:
        """Cold tenants woken by a connection at a proxy, as they happen (nothing without a proxy)."""
        if self.proxy is not None:
            await self.proxy.wakes(on_wake, stop)

    async def rollup_usage(self, hours: int = 2) -> int:
        """Copy the proxies' hourly usage into dynabase.tenantUsage (idempotent upserts)."""
        if self.mongo is None or self.proxy is None:
            return 0
        self._last_rollup = time.monotonic()
        written = 0
        current = int(time.time() // 3600)
        with contextlib.suppress(Exception):
            for hour in range(current - hours + 1, current + 1):
                fields = await self.proxy.usage_fields(hour)
                if fields:
                    written += await self.mongo.write_usage(hour, fields)
        return written

    # -- Railway ----------------------------------------------------------------

    PLATFORM_INTERVAL = 300.0  # partial passes (the operator's batches) look at platform services this often

    async def _railway_pass(self, results: list[TenantResult], dry_run: bool, complete: bool) -> None:
        backend = self.railway
        assert backend is not None
        targets: list[tuple[TenantResult | None, ServiceTarget]] = []
        for result in results:
            spec = result.tenant.spec.railway
            if result.decision is None or spec is None:
                continue
            ref = ServiceRef(spec.project_id, spec.environment_id, spec.service_name)
            password = result.password.reveal() if result.password is not None else None
            target = tenant_service_target(
                result.key, ref, result.tenant.database_name, result.decision.limits, password=password,
                pg_host=self.railway_pg_host, pg_port=self.railway_pg_port,
            )
            if result.cold:  # Railway sleeps it and wakes it on its next request
                target = dataclasses.replace(target, sleep_application=True)
            targets.append((result, target))
        if complete or time.monotonic() - self._platform_checked > self.PLATFORM_INTERVAL:
            targets += [(None, t) for t in self.railway_platform]
            self._platform_checked = time.monotonic()
            self.platform_plans = []
        if not targets:
            return
        environments = await backend.observe(t.ref.environment_id for _, t in targets)
        semaphore = asyncio.Semaphore(backend.concurrency)

        async def one(result: TenantResult | None, target: ServiceTarget) -> None:
            outcome = await self._railway_service(backend, environments[target.ref.environment_id], target,
                                                  result, dry_run, semaphore)
            if result is not None:
                result.outcomes.append(outcome)
            elif not outcome.ok:
                log.warning("railway platform service not reconciled",
                            extra={"service": str(target.ref), "reason": outcome.reason, "error": outcome.message})
                metrics.BACKEND_ERRORS.labels("railway", outcome.reason).inc()

        await asyncio.gather(*(one(r, t) for r, t in targets))

    async def _railway_service(
        self, backend: RailwayBackend, environment: EnvironmentObserved | Exception, target: ServiceTarget,
        result: TenantResult | None, dry_run: bool, semaphore: asyncio.Semaphore,
    ) -> Outcome:
        ref = target.ref
        if isinstance(environment, Exception):
            return Outcome("RailwayReady", False, "ObserveFailed", describe_error(environment))
        if environment.project_id != ref.project_id:
            return Outcome("RailwayReady", False, "WrongProject",
                           f"environment {ref.environment_id} belongs to project {environment.project_id}, "
                           f"not {ref.project_id}; fix spec.railway.projectId")
        observed = environment.services.get(ref.service_name)
        if observed is None:
            return Outcome("RailwayReady", False, "ServiceNotFound",
                           f"no service named {ref.service_name!r} in environment {ref.environment_id}; "
                           "create it in Railway or fix spec.railway.serviceName")
        if backend.own.is_self(ref.environment_id, observed.service_id):
            return Outcome("RailwayReady", False, "OwnService",
                           f"service {ref.service_name!r} runs this reconciler, which never manages itself; "
                           "point spec.railway at the tenant's own service")
        try:
            async with semaphore:
                if (target.v_cpus is not None or target.memory_gb is not None) and \
                        observed.v_cpus is None and observed.memory_gb is None:
                    observed = await backend.with_limits(ref.environment_id, observed)
                plan: ServicePlan = plan_service(target, observed)
                lines = plan.lines()
                if backend.deploy_owed(plan) and not plan.deploy:
                    lines.append(f"service {ref}: deploy once (owed by an earlier pass)")
                if result is not None and lines:
                    result.plans["railway"] = lines
                elif lines:
                    self.platform_plans += lines
                if not dry_run and (plan.mutations or backend.deploy_owed(plan)):
                    await backend.apply(plan, environment.project_id)
        except Exception as exc:
            if result is not None:
                result.events.append(("Warning", "RailwayApplyFailed", describe_error(exc)))
            return Outcome("RailwayReady", False, "ApplyFailed", describe_error(exc))
        sleep = ", sleeps when idle" if target.sleep_application else ""
        return Outcome("RailwayReady", True, "Reconciled", f"service {ref.service_name}: {target.replicas} "
                       f"replica(s){sleep}")

    # -- Proxy ------------------------------------------------------------------

    async def _proxy_prepare(
        self, results: list[TenantResult], deleted: list[TenantResult], dry_run: bool
    ) -> _ProxyState | None:
        assert self.proxy is not None
        try:
            observed = await self.proxy.observe()
        except Exception as exc:
            for result in results:
                if result.decision is not None:
                    result.outcomes.append(Outcome("ProxyReady", False, "ObserveFailed", describe_error(exc)))
            return None
        state = _ProxyState(observed=observed)
        for result in results:
            if result.decision is None:
                continue
            tenant = result.tenant
            target = proxy_limits(
                tenant.key, tenant.database_name,
                pool_name(tenant.spec.tier_policy_ref, result.decision.applied_tier),
                result.decision.limits, enabled=not tenant.spec.suspended, cold=result.cold,
            )
            if result.overage is not None and result.overage.restriction == "qps":
                restricted = result.decision.limits.billing.restricted_qps
                qps = restricted if target.qps is None else min(target.qps, restricted)
                target = dataclasses.replace(target, qps=qps, burst=qps)
            state.targets[tenant.database_name] = (result, target)
            lines = proxy_plan_lines(observed.get(tenant.database_name), target)
            if lines:
                result.plans["proxy"] = lines
        for result in deleted:
            if result.tenant.database_name in observed:
                state.removed.append(result.tenant.database_name)
                result.plans["proxy"] = proxy_plan_lines(observed[result.tenant.database_name], None)
        return state

    async def _proxy_apply(self, state: _ProxyState, *, lowering: bool) -> None:
        assert self.proxy is not None
        changed: dict[str, ProxyTenantLimits] = {}
        for database, (_result, target) in state.targets.items():
            before = state.observed.get(database)
            if before == target or _lowers_proxy(before, target) != lowering:
                continue
            changed[database] = target
        removed = state.removed if lowering else []
        try:
            await self.proxy.apply(changed, removed)
        except Exception as exc:
            for database in changed:
                result = state.targets[database][0]
                result.outcomes.append(Outcome("ProxyReady", False, "PublishFailed", describe_error(exc)))
            return
        if not lowering:
            for result, target in state.targets.values():
                if not any(o.condition_type == "ProxyReady" for o in result.outcomes):
                    qps = "unlimited" if target.qps is None else f"{target.qps}/s"
                    result.outcomes.append(Outcome(
                        "ProxyReady", True, "Published", f"{target.max_connections} connections, {qps}"
                    ))

    # -- PgBouncer --------------------------------------------------------------

    def _pgbouncer_desired(
        self, results: list[TenantResult], deleted: list[TenantResult], policies: dict[str, TierPolicy],
        published: PgBouncerDesired | None, complete: bool,
    ) -> PgBouncerDesired:
        base = published or PgBouncerDesired()
        desired = PgBouncerDesired(
            pools={} if complete else dict(base.pools),
            routes={} if complete else dict(base.routes),
        )
        # Every tier of every policy gets its pool up front, so a tier change lands on a running one.
        for policy_name, policy in policies.items():
            for tier_name, tier in policy.spec.tiers.items():
                try:
                    limits = merge(tier_name, tier.rank, [tier])
                except ResolveError:
                    continue
                desired.pools[pool_name(policy_name, tier_name)] = PoolSettings.of(limits.pgbouncer)
        for result in deleted:
            desired.routes.pop(result.tenant.database_name, None)
        for result in results:
            database = result.tenant.database_name
            if result.decision is None:
                # Unresolvable now: keep serving it as it was rather than drop its route.
                if database in base.routes:
                    desired.routes[database] = base.routes[database]
                continue
            pool = pool_name(result.tenant.spec.tier_policy_ref, result.decision.applied_tier)
            own = PoolSettings.of(result.decision.limits.pgbouncer)
            desired.routes[database] = TenantRoute(
                database=database, role=result.tenant.database_name, pool=pool,
                settings=None if own == desired.pools.get(pool) else own,
                enabled=not result.tenant.spec.suspended,
            )
        return desired

    async def _pgbouncer_pass(
        self, results: list[TenantResult], deleted: list[TenantResult], policies: dict[str, TierPolicy],
        dry_run: bool, complete: bool,
    ) -> None:
        assert self.pgbouncer is not None
        async with self._layout_lock:
            try:
                observed: PgBouncerObserved = await self.pgbouncer.observe()
            except Exception as exc:  # Redis down: PgBouncer keeps its last layout; say so per tenant
                for result in results:
                    if result.decision is not None:
                        result.outcomes.append(
                            Outcome("PgBouncerReady", False, "ObserveFailed", describe_error(exc))
                        )
                return
            desired = self._pgbouncer_desired(results, deleted, policies, observed.published, complete)
            for result in [*results, *deleted]:
                lines = plan_lines(observed.published, desired, result.tenant.database_name)
                if lines:
                    result.plans["pgbouncer"] = lines
            if dry_run:
                return
            version = desired.version
            changed = observed.published is None or observed.published.version != version
            seq = observed.published.seq if observed.published else 0
            try:
                if changed:
                    seq = await self.pgbouncer.publish(desired, version)
            except Exception as exc:
                for result in results:
                    if result.decision is not None:
                        result.outcomes.append(
                            Outcome("PgBouncerReady", False, "PublishFailed", describe_error(exc))
                        )
                return
        agents = observed.agents
        try:
            if changed or any(a.seq < seq for a in agents):
                agents = await self.pgbouncer.wait_confirmed(seq)
        except Exception as exc:
            for result in results:
                if result.decision is not None:
                    result.outcomes.append(Outcome("PgBouncerReady", False, "PublishFailed", describe_error(exc)))
            return
        for result in results:
            if result.decision is None:
                continue
            route = desired.routes[result.tenant.database_name]
            result.outcomes.append(self._pgbouncer_outcome(route, desired, seq, agents))

    @staticmethod
    def _pgbouncer_outcome(route: TenantRoute, desired: PgBouncerDesired, seq: int,
                           agents: list[Any]) -> Outcome:
        if not agents:
            return Outcome("PgBouncerReady", False, "NoAgent",
                           "no pgbouncer-agent has reported in the last 30s; is it running?")
        behind = [a.agent_id for a in agents if a.seq < seq]
        if behind:
            return Outcome("PgBouncerReady", False, "AgentPending",
                           f"agents not yet on layout #{seq}: {', '.join(behind)}")
        for agent in agents:
            ok, why = agent.pool_ok(route.pool)
            if not ok:
                return Outcome("PgBouncerReady", False, "LiveMismatch", why)
        settings = route.settings or desired.pools[route.pool]
        return Outcome("PgBouncerReady", True, "Reconciled",
                       f"pool {route.pool}: pool_size {settings.pool_size}, mode {settings.pool_mode}")

    @staticmethod
    def _usage_outcome(result: TenantResult, previous: TenantDatabaseStatus | None) -> None:
        verdict, limits = result.overage, result.limits
        if verdict is None or limits is None:  # nothing included (any more): no usage series
            metrics.set_restricted(result.key, "", None)
            metrics.set_usage_ratio(result.key, "", None)
            return
        before = previous.usage if previous is not None and previous.usage is not None else None
        if before is not None and before.month != verdict.status.month:
            before = None
        status = verdict.status
        tier = limits.tier
        if status.restriction:
            outcome = Outcome("UsageWithinPlan", False, "Restricted", verdict.message, advisory=True)
        elif status.level == "100" and limits.billing.overage_per_vcpu_hour_usd is None:
            outcome = Outcome("UsageWithinPlan", False, "OverIncludedUsage", verdict.message, advisory=True)
        elif status.level == "100":
            outcome = Outcome("UsageWithinPlan", True, "OverageBilled", verdict.message)
        elif status.level == "80":
            outcome = Outcome("UsageWithinPlan", True, "NearIncludedUsage", verdict.message)
        else:
            outcome = Outcome("UsageWithinPlan", True, "WithinIncludedUsage", verdict.message)
        result.outcomes.append(outcome)
        level_before = before.level if before is not None else None
        if status.level is not None and status.level != level_before and \
                (level_before is None or int(status.level) > int(level_before)):
            metrics.USAGE_THRESHOLDS.labels(tier, status.level).inc()
            reason = "IncludedUsageExceeded" if status.level == "100" else "UsageWarning"
            result.events.append(("Warning", reason, f"{status.level}% of the month's included usage: "
                                  f"{verdict.message}"))
        restriction_before = before.restriction if before is not None else None
        if status.restriction and status.restriction != restriction_before:
            result.events.append(("Warning", "UsageRestricted", verdict.message))
        elif restriction_before and not status.restriction:
            result.events.append(("Normal", "UsageRestrictionLifted", verdict.message))
        metrics.set_restricted(result.key, tier, status.restriction)

    async def _record_status(self, result: TenantResult, previous: TenantDatabaseStatus | None,
                             now: dt.datetime) -> None:
        tenant = result.tenant
        generation = tenant.metadata.generation
        if result.error is not None:
            conditions = [
                make_condition("Ready", False, result.error.reason, result.error.message, previous, generation, now)
            ]
            status = TenantDatabaseStatus(
                observed_generation=generation,
                phase="Degraded",
                applied_tier=previous.applied_tier if previous else None,
                pending_tier=previous.pending_tier if previous else None,
                effective_at=previous.effective_at if previous else None,
                conditions=conditions,
                history=list(previous.history) if previous else [],
            )
        else:
            decision = result.decision
            assert decision is not None
            history = list(previous.history) if previous else []
            previous_tier = previous.applied_tier if previous else None
            if previous_tier != decision.applied_tier:
                history = [*history, TierChange(from_tier=previous_tier, to_tier=decision.applied_tier, at=now,
                                                drained_connections=result.sessions_ended or None)]
                history = history[-HISTORY_LIMIT:]
                result.events.append(
                    ("Normal", "TierApplied", f"tier {decision.applied_tier} applied (was {previous_tier or 'none'})")
                )
            if decision.pending_tier and (previous is None or previous.pending_tier != decision.pending_tier):
                when = decision.effective_at.isoformat() if decision.effective_at else "?"
                result.events.append(
                    ("Normal", "DowngradeScheduled", f"downgrade to {decision.pending_tier} at {when}")
                )
            if decision.change == "cancelled":
                result.events.append(("Normal", "DowngradeCancelled", f"tier stays {decision.applied_tier}"))
            idle_timeout = decision.limits.lifecycle.idle_timeout
            was_cold = previous is not None and previous.phase == "Cold"
            if idle_timeout is not None and not tenant.spec.suspended and self.proxy is not None:
                if result.cold:
                    result.outcomes.append(Outcome("Awake", False, "IdleTimeout", idle_message(idle_timeout),
                                                   advisory=True))
                    if not was_cold:
                        result.events.append(("Normal", "TenantCold", idle_message(idle_timeout)))
                        metrics.COLD_TRANSITIONS.labels("cold").inc()
                else:
                    result.outcomes.append(Outcome("Awake", True, "Active", f"queried within {idle_timeout}"))
            if was_cold and not result.cold:
                result.events.append(("Normal", "TenantWoke", "a connection arrived; tenant is active again"))
                metrics.COLD_TRANSITIONS.labels("woke").inc()
            self._usage_outcome(result, previous)
            if tenant.spec.suspended:
                phase = "Suspended"
            elif not result.ready:
                phase = "Degraded"
            elif result.cold:
                phase = "Cold"
            else:
                phase = "Active"
            status = TenantDatabaseStatus(
                observed_generation=generation,
                phase=phase,
                applied_tier=decision.applied_tier,
                pending_tier=decision.pending_tier,
                effective_at=decision.effective_at,
                conditions=build_conditions(result.outcomes, previous, generation, now),
                history=history,
                usage=result.overage.status if result.overage is not None else None,
            )
        result.status = status
        if status != previous:
            result.status_changed = True
            await self.status_store.save(tenant.key, status)
