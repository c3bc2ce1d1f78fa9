"""The proxy: per-tenant connection and rate limits, published to every replica.

Limits that fall are published first and limits that rise last (see ``order``);
a tenant that is deleted leaves the proxy with the falling ones.
"""

from __future__ import annotations

from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.pgbouncer import pool_name
from dynabase.desired.proxy import ProxyTenantLimits, lowers, plan_lines, proxy_limits, restricted

from ..conditions import Outcome
from ..results import TenantResult
from .base import BackendPass, PassRun, Phase


class ProxyPass(BackendPass):
    backend = "proxy"
    condition = "ProxyReady"

    def __init__(self, run: PassRun, proxy: ProxyBackend) -> None:
        super().__init__(run)
        self.proxy = proxy
        self.observed: dict[str, ProxyTenantLimits] = {}
        self.targets: dict[str, tuple[TenantResult, ProxyTenantLimits]] = {}  # by database
        self.removed: list[str] = []

    async def observe(self) -> None:
        self.observed = await self.proxy.observe()

    def plan(self) -> None:
        for result in self.run.resolved:
            tenant, decision = result.tenant, result.decision
            assert decision is not None
            target = proxy_limits(
                tenant.key, tenant.database_name, pool_name(tenant.spec.tier_policy_ref, decision.applied_tier),
                decision.limits, enabled=not tenant.spec.suspended, cold=result.cold, org_id=tenant.spec.org_id,
            )
            target = restricted(target, result.restriction, decision.limits.billing.restricted_qps)
            self.targets[tenant.database_name] = (result, target)
            lines = plan_lines(self.observed.get(tenant.database_name), target)
            if lines:
                result.plans["proxy"] = lines
        for result in self.run.deleted:
            database = result.tenant.database_name
            if database in self.observed:
                self.removed.append(database)
                result.plans["proxy"] = plan_lines(self.observed[database], None)

    async def apply(self, phase: Phase) -> None:
        falling = phase is Phase.FALLING
        changed: dict[str, ProxyTenantLimits] = {}
        for database, (_result, target) in self.targets.items():
            before = self.observed.get(database)
            if before == target or lowers(before, target) != falling:
                continue
            changed[database] = target
        try:
            await self.proxy.apply(changed, self.removed if falling else [])
        except Exception as exc:
            self.fail([self.targets[database][0] for database in changed], "PublishFailed", exc)
            return
        if falling:
            return
        for result, target in self.targets.values():
            if not any(o.condition_type == self.condition for o in result.outcomes):
                qps = "unlimited" if target.qps is None else f"{target.qps}/s"
                result.outcomes.append(Outcome(
                    self.condition, True, "Published", f"{target.max_connections} connections, {qps}"
                ))
