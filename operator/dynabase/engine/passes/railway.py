"""Railway: each tenant's dedicated service (replicas, sleep, CPU/memory, variables), and the
platform's own services, which partial passes look at only every ``interval`` seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dynabase.backends.railway import EnvironmentObserved, RailwayBackend
from dynabase.desired.railway import (
    ServiceObserved,
    ServicePlan,
    ServiceRef,
    ServiceTarget,
    plan_service,
    tenant_service_target,
)

from .. import metrics
from ..conditions import Outcome
from ..failures import OBSERVE_FAILED, describe_error
from ..results import TenantResult
from .base import BackendPass, PassRun, Phase

log = logging.getLogger(__name__)


@dataclass
class PlatformSchedule:
    """When the platform's services were last looked at, and what that found to change.
    Outlives a pass: the engine keeps one."""

    checked: float = -1e9  # time.monotonic()
    plans: list[str] = field(default_factory=list)

    def due(self, complete: bool, interval: float) -> bool:
        if not complete and time.monotonic() - self.checked <= interval:
            return False
        self.checked = time.monotonic()
        self.plans = []
        return True


@dataclass
class _Service:
    result: TenantResult | None  # None: a platform service
    target: ServiceTarget
    project_id: str = ""
    observed: ServiceObserved | None = None
    plan: ServicePlan | None = None
    settled: bool = False  # its outcome is known (it cannot be managed, or it failed)


class RailwayPass(BackendPass):
    backend = "railway"
    condition = "RailwayReady"

    def __init__(self, run: PassRun, railway: RailwayBackend, *, platform: Sequence[ServiceTarget],
                 schedule: PlatformSchedule, interval: float, pg_host: str | None, pg_port: int | None) -> None:
        super().__init__(run)
        self.railway = railway
        self.platform, self.schedule, self.interval = platform, schedule, interval
        self.pg_host, self.pg_port = pg_host, pg_port
        self.services: list[_Service] = []

    def affected(self) -> Sequence[TenantResult]:
        return [s.result for s in self.services if s.result is not None]

    def _tenant_services(self) -> list[_Service]:
        services = []
        for result in self.run.resolved:
            spec = result.tenant.spec.railway
            if spec is None:
                continue
            assert result.decision is not None
            ref = ServiceRef(spec.project_id, spec.environment_id, spec.service_name)
            target = tenant_service_target(
                result.key, ref, result.tenant.database_name, result.decision.limits,
                password=result.password.reveal() if result.password is not None else None,
                pg_host=self.pg_host, pg_port=self.pg_port,
            )
            if result.cold:  # Railway sleeps it and wakes it on its next request
                target = dataclasses.replace(target, sleep_application=True)
            services.append(_Service(result, target))
        return services

    async def observe(self) -> None:
        self.services = self._tenant_services()
        if self.schedule.due(self.run.complete, self.interval):
            self.services += [_Service(None, t) for t in self.platform]
        if not self.services:
            return
        environments = await self.railway.observe(s.target.ref.environment_id for s in self.services)
        semaphore = asyncio.Semaphore(self.railway.concurrency)
        await asyncio.gather(*(
            self._observe_one(s, environments[s.target.ref.environment_id], semaphore) for s in self.services
        ))

    async def _observe_one(self, service: _Service, environment: EnvironmentObserved | Exception,
                           semaphore: asyncio.Semaphore) -> None:
        found = self._find(service.target.ref, environment)
        if isinstance(found, Outcome):
            self._settle(service, found)
            return
        assert not isinstance(environment, Exception)
        service.project_id, target = environment.project_id, service.target
        try:
            if (target.v_cpus is not None or target.memory_gb is not None) and \
                    found.v_cpus is None and found.memory_gb is None:
                async with semaphore:
                    found = await self.railway.with_limits(target.ref.environment_id, found)
        except Exception as exc:  # a read that failed: nothing was applied, so no apply-failure Event
            self._settle(service, Outcome(self.condition, False, OBSERVE_FAILED, describe_error(exc)))
            return
        service.observed = found

    def _find(self, ref: ServiceRef, environment: EnvironmentObserved | Exception) -> ServiceObserved | Outcome:
        """The service ``ref`` names, or why it cannot be managed."""
        if isinstance(environment, Exception):
            return Outcome(self.condition, False, OBSERVE_FAILED, describe_error(environment))
        if environment.project_id != ref.project_id:
            return Outcome(self.condition, False, "WrongProject",
                           f"environment {ref.environment_id} belongs to project {environment.project_id}, "
                           f"not {ref.project_id}; fix spec.railway.projectId")
        observed = environment.services.get(ref.service_name)
        if observed is None:
            return Outcome(self.condition, False, "ServiceNotFound",
                           f"no service named {ref.service_name!r} in environment {ref.environment_id}; "
                           "create it in Railway or fix spec.railway.serviceName")
        if self.railway.own.is_self(ref.environment_id, observed.service_id):
            return Outcome(self.condition, False, "OwnService",
                           f"service {ref.service_name!r} runs this reconciler, which never manages itself; "
                           "point spec.railway at the tenant's own service")
        return observed

    def plan(self) -> None:
        for service in self.services:
            if service.settled:
                continue
            assert service.observed is not None
            plan = service.plan = plan_service(service.target, service.observed)
            lines = plan.lines()
            if self.railway.deploy_owed(plan) and not plan.deploy:
                lines.append(f"service {service.target.ref}: deploy once (owed by an earlier pass)")
            if service.result is not None and lines:
                service.result.plans["railway"] = lines
            elif lines:
                self.schedule.plans += lines

    async def apply(self, phase: Phase) -> None:
        semaphore = asyncio.Semaphore(self.railway.concurrency)
        await asyncio.gather(*(self._apply_one(s, semaphore) for s in self.services if not s.settled))

    async def _apply_one(self, service: _Service, semaphore: asyncio.Semaphore) -> None:
        plan, target = service.plan, service.target
        assert plan is not None
        try:
            if plan.mutations or self.railway.deploy_owed(plan):
                async with semaphore:
                    await self.railway.apply(plan, service.project_id)
        except Exception as exc:
            self._failed(service, exc)
            return
        sleep = ", sleeps when idle" if target.sleep_application else ""
        message = f"service {target.ref.service_name}: {target.replicas} replica(s){sleep}"
        self._settle(service, Outcome(self.condition, True, "Reconciled", message))

    def _failed(self, service: _Service, exc: Exception) -> None:
        if service.result is not None:
            self.fail([service.result], "ApplyFailed", exc, event="RailwayApplyFailed")
            service.settled = True
        else:
            self._settle(service, Outcome(self.condition, False, "ApplyFailed", describe_error(exc)))

    def _settle(self, service: _Service, outcome: Outcome) -> None:
        service.settled = True
        if service.result is not None:
            service.result.outcomes.append(outcome)
        elif not outcome.ok:
            log.warning("railway platform service not reconciled",
                        extra={"service": str(service.target.ref), "reason": outcome.reason, "error": outcome.message})
            metrics.BACKEND_ERRORS.labels("railway", outcome.reason).inc()
