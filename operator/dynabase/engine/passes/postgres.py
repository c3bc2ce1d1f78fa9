"""Postgres: each tenant's role and database (connection limit, settings, password, grants).

A missing password is generated only once the roles are read: a role that already has
one never gets another (``passwords``), and the plan shows the password it will set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from dynabase.backends.postgres import PostgresBackend
from dynabase.desired.postgres import (
    PostgresObserved,
    PostgresPlan,
    PostgresTarget,
    deletion_target,
    lowers_connection_limit,
    needs_database,
    plan_postgres,
    render_plan,
    tenant_target,
)
from dynabase.desired.warm_pool import pool_prefix

from .. import metrics
from ..conditions import Outcome
from ..failures import with_retries
from ..passwords import secret_failed, settle_passwords
from ..results import TenantResult
from ..stores import SecretStore
from ..warm_pool import CLAIMS
from .base import BackendPass, PassRun, Phase


class PostgresPass(BackendPass):
    backend = "postgres"
    condition = "PostgresReady"

    def __init__(self, run: PassRun, postgres: PostgresBackend, secrets: SecretStore) -> None:
        super().__init__(run)
        self.postgres, self.secrets = postgres, secrets
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

