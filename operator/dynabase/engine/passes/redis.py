"""Redis: each tenant's ACL user, confined to its key prefix and made read-only over its quota."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.redis import (
    ObservedAcl,
    QuotaVerdict,
    RedisTarget,
    acl_drift,
    acl_username,
    key_prefix,
    password_hash,
    quota_verdict,
)

from .. import metrics
from ..conditions import Outcome
from ..results import TenantResult
from .base import BackendPass, PassRun, Phase


@dataclass
class _UserPlan:
    result: TenantResult
    target: RedisTarget
    verdict: QuotaVerdict
    before: ObservedAcl | None
    drift: list[str]  # why the user must be written; empty when it matches


class RedisPass(BackendPass):
    backend = "redis"
    condition = "RedisReady"

    def __init__(self, run: PassRun, redis: RedisBackend) -> None:
        super().__init__(run)
        self.redis = redis
        self.active: list[TenantResult] = []  # tenants with a user: resolved, with a password
        self.users: list[_UserPlan] = []

    def affected(self) -> Sequence[TenantResult]:
        return self.active

    async def observe(self) -> None:
        self.active = self.run.with_password()
        backend = self.redis
        backend.known_prefixes |= {key_prefix(r.tenant.database_name) for r in self.active}
        await backend.walk(sorted(backend.known_prefixes))
        names = [acl_username(r.tenant.database_name) for r in [*self.active, *self.run.deleted]]
        self.observed = await backend.observe(names)
        self.canonical = {ro: await backend.canonical_commands(ro) for ro in (False, True)}

    def plan(self) -> None:
        for result in self.active:
            tenant, limits = result.tenant, result.limits
            assert limits is not None and result.password is not None
            keys, memory = self.redis.usage(key_prefix(tenant.database_name))
            before = self.observed.get(acl_username(tenant.database_name))
            verdict = quota_verdict(limits.redis, keys, memory, read_only_before=self._read_only(before))
            target = RedisTarget(tenant.key, tenant.database_name, password_hash(result.password.reveal()),
                                 read_only=verdict.over, enabled=not tenant.spec.suspended)
            drift = acl_drift(target, before, self.canonical[target.read_only])
            if drift:
                result.plans["redis"] = [f"ACL SETUSER {target.username} ({'; '.join(drift)})"]
            self.users.append(_UserPlan(result, target, verdict, before, drift))
        for result in self.run.deleted:
            name = acl_username(result.tenant.database_name)
            if self.observed.get(name) is not None:
                result.plans["redis"] = [f"ACL DELUSER {name}"]

    async def apply(self, phase: Phase) -> None:
        wrote = False
        for user in self.users:
            try:
                if user.drift:
                    await self.redis.apply(user.target)
                    wrote = True
            except Exception as exc:
                self.fail([user.result], "ApplyFailed", exc)
                continue
            self._judge(user)
        for result in self.run.deleted:
            tenant = result.tenant
            try:
                if self.observed.get(acl_username(tenant.database_name)) is not None:
                    await self.redis.apply(RedisTarget(tenant.key, tenant.database_name, "", False, present=False))
                    wrote = True
                if tenant.spec.deletion_policy == "Delete":
                    await self.redis.drop_keys(key_prefix(tenant.database_name))
            except Exception as exc:
                self.fail([result], "DeleteFailed", exc)
        if wrote:
            with contextlib.suppress(Exception):
                await self.redis.persist()

    def _read_only(self, before: ObservedAcl | None) -> bool:
        return before is not None and before.commands == self.canonical[True]

    def _judge(self, user: _UserPlan) -> None:
        result, verdict, username = user.result, user.verdict, user.target.username
        was_read_only = self._read_only(user.before)
        if verdict.over:
            reason = "QuotaExceeded" if verdict.measured else "QuotaUnknown"
            result.outcomes.append(Outcome(self.condition, False, reason, verdict.message))
            if not was_read_only:
                metrics.REDIS_DEMOTIONS.inc()
                metrics.limit_hit(result.key, "redis_quota")
                result.events.append(("Warning", "RedisQuotaExceeded", f"writes refused: {verdict.message}"))
        else:
            result.outcomes.append(Outcome(self.condition, True, "Reconciled", f"user {username}: {verdict.message}"))
            if was_read_only:
                result.events.append(("Normal", "RedisQuotaRestored", f"writes allowed again: {verdict.message}"))
