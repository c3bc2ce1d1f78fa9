"""Postgres: each tenant's role and database (connection limit, settings, password, grants).

A missing password is generated only once the roles are read: a role that already has
one never gets another (``passwords``), and the plan shows the password it will set.
With allowed sources configured, pg_hba.conf is read in the same observation and each
tenant gets the advisory ``DirectAccess`` condition (``desired.pg_hba``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from dynabase.backends.postgres import PostgresBackend
from dynabase.desired.pg_hba import AllowedSources, PgHbaObserved, direct_access
from dynabase.desired.postgres import (
    PostgresPlan,
    PostgresTarget,
    deletion_target,
    lowers_connection_limit,
    needs_database,
    plan_postgres,
    render_plan,
    tenant_target,
)
from dynabase.desired.postgres_observed import PostgresObserved
from dynabase.desired.warm_pool import pool_prefix

from .. import metrics
from ..conditions import Outcome
from ..failures import describe_error, with_retries
from ..passwords import secret_failed, settle_passwords
from ..results import TenantResult
from ..stores import SecretStore
from ..warm_pool import CLAIMS
from .base import BackendPass, PassRun, Phase


class PostgresPass(BackendPass):
    backend = "postgres"
    condition = "PostgresReady"

    def __init__(self, run: PassRun, postgres: PostgresBackend, secrets: SecretStore,
                 allowed_sources: AllowedSources | None = None) -> None:
        super().__init__(run)
        self.postgres, self.secrets = postgres, secrets
        self.allowed_sources = allowed_sources  # None: pg_hba.conf is not judged
        self.hba: PgHbaObserved | str | None = None  # the rules, or why they could not be read
        self.targets: dict[str, PostgresTarget] = {}
        for result in run.resolved:
            assert result.limits is not None
            self.targets[result.key] = tenant_target(
                result.tenant, result.limits, password=result.password, restriction=result.restriction,
                cold=result.cold, warm_pool=pool_prefix(result.tenant.spec.tier_policy_ref),
            )
        for result in run.deleted:
            self.targets[result.key] = deletion_target(result.tenant)
        self.plans: dict[str, PostgresPlan] = {}
        self.falling: set[str] = set()  # tenants whose connection limit falls

    def affected(self) -> Sequence[TenantResult]:
        return self.run.everyone

    async def observe(self) -> None:
        targets = self.targets.values()
        self.observed: PostgresObserved = await with_retries(
            lambda: self.postgres.observe([t.role for t in targets], [t.database for t in targets])
        )
        await settle_passwords(self.secrets, self.run.results, self.targets, self.observed, self.run.dry_run)
        if self.allowed_sources is not None:
            try:
                self.hba = await self.postgres.observe_hba(t.role for t in targets)
            except Exception as exc:  # advisory: its own Unknown condition, never the pass's failure
                self.hba = describe_error(exc)

    def plan(self) -> None:
        left = dict(self.observed.warm_pool)  # each pool database is planned for one tenant at most
        for key, target in self.targets.items():
            claim = target.warm_pool is not None and left.get(target.warm_pool, 0) > 0 \
                and needs_database(target, self.observed)
            if claim and target.warm_pool is not None:
                left[target.warm_pool] -= 1
            self.plans[key] = plan_postgres(target, self.observed, claim=claim)
        self.falling = {k for k, t in self.targets.items() if lowers_connection_limit(t, self.observed)}
        for result in self.run.everyone:
            plan = self.plans.get(result.key)
            if plan is None:
                continue
            result.plans["postgres"] = render_plan(plan)
            target = self.targets[result.key]
            if target.password is None and target.state == "active" and not secret_failed(result):
                result.plans["postgres"].append("(a password would be generated into the tenant's Secret)")
        self._judge_direct_access()

    def _judge_direct_access(self) -> None:
        """DirectAccess for each active tenant: True (advisory) when its role could skip the proxy."""
        allowed = self.allowed_sources
        if allowed is None or self.hba is None:
            return
        for result in self.run.resolved:
            target = self.targets[result.key]
            if target.state != "active":
                continue  # a role that cannot log in cannot go around the proxy either
            if isinstance(self.hba, str):
                result.outcomes.append(Outcome("DirectAccess", False, "PgHbaUnreadable",
                                               f"pg_hba_file_rules could not be read ({self.hba})",
                                               advisory=True, status="Unknown"))
                continue
            verdict = direct_access(self.hba, target.database, target.role, allowed)
            if verdict.open is None:
                result.outcomes.append(Outcome("DirectAccess", False, "PgHbaInvalid", verdict.message,
                                               advisory=True, status="Unknown"))
            elif verdict.open:
                result.outcomes.append(Outcome("DirectAccess", False, "OpenInPgHba", verdict.message,
                                               advisory=True, status="True"))
            else:
                result.outcomes.append(Outcome("DirectAccess", True, "ProxyOnly", verdict.message, status="False"))

    async def apply(self, phase: Phase) -> None:
        semaphore = asyncio.Semaphore(self.run.concurrency)
        falling = phase is Phase.FALLING
        await asyncio.gather(*(
            self._apply_one(r, semaphore) for r in self.run.everyone
            if (r.key in self.falling) == falling and r.error is None
        ))

    async def _apply_one(self, result: TenantResult, semaphore: asyncio.Semaphore) -> None:
        plan = self.plans.get(result.key)
        if plan is None:
            return
        if plan.conflict:
            result.outcomes.append(Outcome(self.condition, False, "RoleConflict", plan.conflict))
            return
        async with semaphore:
            try:
                applied = await with_retries(lambda: self.postgres.apply(plan))
            except Exception as exc:  # this tenant's condition
                self.fail([result], "ApplyFailed", exc, event="PostgresApplyFailed")
                return
        ended, limits = applied.ended, result.limits
        if applied.claimed or applied.pool_empty:
            CLAIMS.labels("claimed" if applied.claimed else "pool_empty").inc()
        message = (
            f"role {result.tenant.database_name}: connection limit {limits.postgres.connection_limit}"
            if limits else "removed"
        )
        result.outcomes.append(Outcome(self.condition, True, "Reconciled", message))
        if ended and limits is not None:
            result.sessions_ended = ended
            metrics.SESSIONS_ENDED.labels("cold" if result.cold else "over_limit").inc(ended)
            if not result.cold:
                result.events.append(("Normal", "ConnectionsDrained", (
                    f"{ended} session(s) over the connection limit of {limits.postgres.connection_limit} "
                    f"(tier {limits.tier}) ended, idle ones first, then the newest")))

