"""MongoDB: each tenant's user and the org record the platform's apps read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dynabase.backends.mongo import MongoBackend
from dynabase.desired.mongo import org_changed, org_document

from ..conditions import Outcome
from ..results import TenantResult
from .base import BackendPass, PassRun, Phase


@dataclass
class UserCheckRotation:
    """Which tenants' users a pass checks. A check costs a round trip per tenant database, so
    beyond new or changed tenants a rotating slice is checked each pass (bounded work) and
    drift is found within a few passes. Outlives a pass: the engine keeps one."""

    cursor: int = 0

    def take(self, active: list[TenantResult], count: int) -> list[TenantResult]:
        if not active:
            return []
        start = self.cursor % len(active)
        taken = (active[start:] + active[:start])[:count]
        self.cursor = start + len(taken)
        return taken


@dataclass
class _OrgPlan:
    result: TenantResult
    document: dict[str, Any]
    differs: bool


class MongoPass(BackendPass):
    backend = "mongo"
    condition = "MongoReady"

    def __init__(self, run: PassRun, mongo: MongoBackend, rotation: UserCheckRotation, checks_per_pass: int,
                 after_apply: Callable[[], Awaitable[object]] | None = None) -> None:
        super().__init__(run)
        self.mongo = mongo
        self.rotation, self.checks_per_pass = rotation, checks_per_pass
        self.after_apply = after_apply  # run once the pass applied (the usage rollup rides along)
        self.active: list[TenantResult] = []  # tenants with a user: resolved, with a password
        self.orgs_planned: list[_OrgPlan] = []
        self.checked: set[str] = set()

    def affected(self) -> Sequence[TenantResult]:
        return self.active

    async def observe(self) -> None:
        self.active = self.run.with_password()
        self.roles_supported = await self.mongo.detect()
        self.orgs = await self.mongo.orgs([r.key for r in [*self.active, *self.run.deleted]])

    def plan(self) -> None:
        self.checked = {r.key for r in self.active if r.key not in self.orgs}
        self.checked |= {r.key for r in self.rotation.take(self.active, self.checks_per_pass)}
        for result in self.active:
            tenant, limits = result.tenant, result.limits
            assert limits is not None
            policy = self.run.policies.get(tenant.spec.tier_policy_ref)
            doc = org_document(tenant.key, tenant.spec.org_id, tenant.database_name, limits,
                               tenant.spec.tier_policy_ref, policy.metadata.generation if policy else None)
            differs = org_changed(self.orgs.get(tenant.key), doc)
            if differs:
                result.plans.setdefault("mongo", []).append(f"upsert organizations/{tenant.key} (tier {limits.tier})")
            self.orgs_planned.append(_OrgPlan(result, doc, differs))

    async def apply(self, phase: Phase) -> None:
        semaphore = asyncio.Semaphore(self.run.concurrency)
        await asyncio.gather(*(self._apply_one(org, semaphore) for org in self.orgs_planned))
        for result in self.run.deleted:
            tenant = result.tenant
            try:
                await self.mongo.drop_user(tenant.database_name, tenant.database_name,
                                           drop_database=tenant.spec.deletion_policy == "Delete")
                await self.mongo.delete_org(tenant.key)
            except Exception as exc:
                self.fail([result], "DeleteFailed", exc)
        if self.after_apply is not None:
            await self.after_apply()

    async def _apply_one(self, org: _OrgPlan, semaphore: asyncio.Semaphore) -> None:
        result = org.result
        database = result.tenant.database_name
        assert result.password is not None
        roles = [{"role": "readWrite", "db": database}] if self.roles_supported else []
        try:
            async with semaphore:
                if result.key in self.checked or org.differs:
                    current = await self.mongo.user(database, database)
                    done = await self.mongo.ensure_user(database, database, result.password.reveal(), roles, current)
                    if done:
                        result.plans.setdefault("mongo", []).append(f"user {database}: {', '.join(done)}")
                await self.mongo.upsert_org(org.document, self.orgs.get(result.key))
        except Exception as exc:
            self.fail([result], "ApplyFailed", exc)
            return
        if self.roles_supported:
            result.outcomes.append(Outcome(self.condition, True, "Reconciled", f"user {database}: readWrite"))
        else:
            result.outcomes.append(Outcome(
                self.condition, False, "RolesUnsupported",
                f"user {database} exists without roles: this server (FerretDB) has no authorization, "
                "so any authenticated user can read other databases", advisory=True,
            ))
