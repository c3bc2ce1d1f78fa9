"""Railway as a backend: observe whole environments, apply per-service plans.

A service whose settings or variables changed needs a deployment to take them
up. If a pass changes settings and then fails before its deploy, nothing in
Railway would show the drift on the next pass, so the owed deploy is remembered
here and done then.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from dynabase.desired.railway import ServiceObserved, ServicePlan, parse_environment, parse_limits

from .client import RailwayAuth, RailwayClient

MAX_PAGES = 20  # 2,000 services in one environment is far beyond any real project


@dataclass
class EnvironmentObserved:
    environment_id: str
    project_id: str
    services: dict[str, ServiceObserved] = field(default_factory=dict)  # by service name


@dataclass(frozen=True)
class OwnService:
    """Railway tells every deployment who it is; the reconciler must never manage itself."""

    environment_id: str | None
    service_id: str | None

    @classmethod
    def from_env(cls) -> OwnService:
        return cls(os.environ.get("RAILWAY_ENVIRONMENT_ID"), os.environ.get("RAILWAY_SERVICE_ID"))

    def is_self(self, environment_id: str, service_id: str) -> bool:
        return self.service_id == service_id and self.environment_id in (None, environment_id)


class RailwayBackend:
    def __init__(self, client: RailwayClient, *, own: OwnService | None = None, concurrency: int = 4) -> None:
        self.client = client
        self.own = own or OwnService.from_env()
        self.concurrency = concurrency
        self.owed_deploys: set[tuple[str, str]] = set()  # (environment, service) changed but not deployed
        # Limits cost a request per service when the environment config lacks them. They are
        # re-read at most this often (and after our own writes we know them), so a quiet pass
        # stays at one request per environment; hand-made limit changes are found within it.
        self.limits_refresh = 3600.0
        self._limits: dict[tuple[str, str], tuple[float, float | None, float | None]] = {}

    @classmethod
    def from_settings(cls, token: str, kind: str, url: str, hourly_budget: int) -> RailwayBackend:
        auth = RailwayAuth(token, "project" if kind == "project" else "account")
        return cls(RailwayClient(auth, url=url, hourly_budget=hourly_budget))

    async def close(self) -> None:
        await self.client.close()

    async def observe(self, environment_ids: Iterable[str]) -> dict[str, EnvironmentObserved | Exception]:
        """Each environment once; a failure is that environment's, not the pass's."""
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(environment_id: str) -> EnvironmentObserved | Exception:
            async with semaphore:
                try:
                    return await self._environment(environment_id)
                except Exception as exc:  # reported per service by the engine
                    return exc

        ids = sorted(set(environment_ids))
        return dict(zip(ids, await asyncio.gather(*(one(e) for e in ids)), strict=True))

    async def _environment(self, environment_id: str) -> EnvironmentObserved:
        instances: list[dict[str, Any]] = []
        after: str | None = None
        config: dict[str, Any] = {}
        project_id = ""
        for _ in range(MAX_PAGES):
            data = await self.client.execute("EnvironmentState", {"environmentId": environment_id, "after": after})
            environment = data["environment"]
            config, project_id = environment.get("config") or {}, environment["projectId"]
            connection = environment["serviceInstances"]
            instances += [edge["node"] for edge in connection["edges"]]
            if not connection["pageInfo"]["hasNextPage"]:
                break
            after = connection["pageInfo"]["endCursor"]
        return EnvironmentObserved(environment_id, project_id, parse_environment(config, instances))

    async def with_limits(self, environment_id: str, observed: ServiceObserved) -> ServiceObserved:
        """The service with its CPU/memory limits, read back with serviceInstanceLimitOverride when stale."""
        key = (environment_id, observed.service_id)
        cached = self._limits.get(key)
        if cached is None or time.monotonic() - cached[0] > self.limits_refresh:
            data = await self.client.execute(
                "ServiceLimits", {"environmentId": environment_id, "serviceId": observed.service_id}
            )
            v_cpus, memory_gb = parse_limits(data.get("serviceInstanceLimitOverride"))
            cached = self._limits[key] = (time.monotonic(), v_cpus, memory_gb)
        return replace(observed, v_cpus=cached[1], memory_gb=cached[2])

    def deploy_owed(self, plan: ServicePlan) -> bool:
        return (plan.target.ref.environment_id, plan.observed.service_id) in self.owed_deploys

    async def apply(self, plan: ServicePlan, project_id: str) -> int:
        """The plan's mutations in order, then one deploy; returns the number of mutations sent."""
        environment_id, service_id = plan.target.ref.environment_id, plan.observed.service_id
        if self.own.is_self(environment_id, service_id):
            raise PermissionError("refusing to change the reconciler's own Railway service")
        key = (environment_id, service_id)
        sent = 0
        if plan.update:
            await self.client.execute("ServiceInstanceUpdate", {
                "environmentId": environment_id, "serviceId": service_id, "input": plan.update,
            })
            sent += 1
            self.owed_deploys.add(key)
        if plan.limits:
            self._limits.pop(key, None)  # unknown until it succeeded
            await self.client.execute("ServiceLimitsUpdate", {
                "input": {"environmentId": environment_id, "serviceId": service_id, **plan.limits},
            })
            sent += 1
            self._limits[key] = (time.monotonic(), plan.limits.get("vCPUs"), plan.limits.get("memoryGB"))
            self.owed_deploys.add(key)
        if plan.variables:
            await self.client.execute("VariablesUpsert", {"input": {
                "projectId": project_id, "environmentId": environment_id, "serviceId": service_id,
                "variables": plan.variables, "skipDeploys": True, "replace": False,
            }})
            sent += 1
            self.owed_deploys.add(key)
        if key in self.owed_deploys:
            await self.client.execute("ServiceDeploy", {"environmentId": environment_id, "serviceId": service_id})
            sent += 1
            self.owed_deploys.discard(key)
        return sent

    async def usage(
        self, project_id: str, start: dt.datetime, end: dt.datetime, measurements: Iterable[str],
    ) -> dict[str, dict[str, float]]:
        """Measured usage per service id over [start, end): {serviceId: {measurement: value}}."""
        data = await self.client.execute("ProjectUsage", {
            "projectId": project_id, "measurements": list(measurements),
            "startDate": start.isoformat(), "endDate": end.isoformat(),
        })
        usage: dict[str, dict[str, float]] = {}
        for row in data.get("usage") or []:
            service = (row.get("tags") or {}).get("serviceId") or ""
            usage.setdefault(service, {})
            usage[service][row["measurement"]] = usage[service].get(row["measurement"], 0.0) + float(row["value"])
        return usage
