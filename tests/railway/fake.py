"""A fake of Railway's GraphQL API for tests: graphql-core executes the
hand-written subset schema (schema.graphql) over in-memory state, so a document
that is not valid against the schema fails here as it would at Railway.

It checks the token the way Railway does (a GraphQL error, HTTP 200), sends
X-RateLimit-* headers, and can be told to answer 429 or 5xx next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import graphql
from aiohttp import web

SCHEMA_PATH = Path(__file__).with_name("schema.graphql")
GB = 1_000_000_000


@dataclass
class FakeService:
    id: str
    name: str
    region: str = "us-west2"
    regions: dict[str, int] | None = None  # multiRegionConfig; None = single region, numReplicas only
    num_replicas: int = 1
    sleep_application: bool = False
    restart_policy: str = "ON_FAILURE"
    restart_retries: int = 10
    variables: dict[str, str] = field(default_factory=dict)
    limits: dict[str, float] | None = None  # {"vCPUs", "memoryGB"} when overridden
    deployments: int = 0
    deploys_triggered_by_variables: int = 0

    @property
    def replicas(self) -> int:
        return sum(self.regions.values()) if self.regions else self.num_replicas


@dataclass
class FakeEnvironment:
    id: str
    project_id: str
    name: str = "production"
    services: dict[str, FakeService] = field(default_factory=dict)


@dataclass
class InjectedFailure:
    status: int
    retry_after: float | None = None
    operation: str | None = None  # only requests for this operation; None = the next request


class FakeRailway:
    def __init__(self, token: str = "test-token", *, kind: str = "account", limit_per_hour: int = 10_000,
                 config_has_limits: bool = False) -> None:
        self.schema = graphql.build_schema(SCHEMA_PATH.read_text())
        self.token, self.kind = token, kind
        self.limit_per_hour = limit_per_hour
        self.config_has_limits = config_has_limits  # Railway's config may carry limitOverride; test both ways
        self.environments: dict[str, FakeEnvironment] = {}
        self.usage_rows: list[dict[str, Any]] = []
        self.failures: list[InjectedFailure] = []
        self.requests: Counter[str] = Counter()
        self.mutations: list[tuple[str, dict[str, Any]]] = []
        self.seen_auth_headers: list[dict[str, str]] = []
        self.sent = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- state ------------------------------------------------------------------

    def add_service(self, environment_id: str, project_id: str, name: str, **kwargs: Any) -> FakeService:
        environment = self.environments.setdefault(environment_id, FakeEnvironment(environment_id, project_id))
        service = FakeService(id=f"svc-{name}-{len(environment.services)}", name=name, **kwargs)
        environment.services[service.id] = service
        return service

    def service(self, environment_id: str, name: str) -> FakeService:
        return next(s for s in self.environments[environment_id].services.values() if s.name == name)

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None,
                  operation: str | None = None) -> None:
        self.failures += [InjectedFailure(status, retry_after, operation)] * times

    def reset_counts(self) -> None:
        self.requests.clear()
        self.mutations.clear()

    @property
    def mutation_names(self) -> list[str]:
        return [name for name, _ in self.mutations]

    # -- server -----------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/graphql/v2", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/graphql/v2"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorised(self, request: web.Request) -> bool:
        self.seen_auth_headers.append({k: v for k, v in request.headers.items()
                                       if k.lower() in ("authorization", "project-access-token")})
        if self.kind == "project":
            return request.headers.get("Project-Access-Token") == self.token
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.sent += 1
        remaining = max(0, self.limit_per_hour - self.sent)
        headers = {"X-RateLimit-Limit": str(self.limit_per_hour), "X-RateLimit-Remaining": str(remaining),
                   "X-RateLimit-Reset": str(int(time.time()) + 3600)}
        body = await request.json()
        name = body.get("operationName") or "?"
        self.requests[name] += 1
        failure = next((f for f in self.failures if f.operation in (None, name)), None)
        if failure is not None:
            self.failures.remove(failure)
            if failure.retry_after is not None:
                headers["Retry-After"] = str(failure.retry_after)
            return web.json_response({"errors": [{"message": f"injected {failure.status}"}]},
                                     status=failure.status, headers=headers)
        if self.sent > self.limit_per_hour:
            return web.json_response({"errors": [{"message": "rate limited"}]}, status=429,
                                     headers={**headers, "Retry-After": "60"})
        if not self._authorised(request):
            return web.json_response({"errors": [{"message": "Not Authorized"}]}, headers=headers)
        result = await graphql.graphql(
            self.schema, body["query"], root_value=_Root(self), variable_values=body.get("variables"),
            operation_name=body.get("operationName"),
        )
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            payload["errors"] = [{"message": e.message} for e in result.errors]
        elif body["query"].lstrip().startswith("mutation") or "\nmutation " in body["query"]:
            self.mutations.append((name, body.get("variables") or {}))
        return web.Response(text=json.dumps(payload), content_type="application/json", headers=headers)


class _Root:
    """Root resolvers: graphql-core calls these with (info, **arguments)."""

    def __init__(self, fake: FakeRailway) -> None:
        self.fake = fake

    def _environment(self, environment_id: str) -> FakeEnvironment:
        try:
            return self.fake.environments[environment_id]
        except KeyError:
            raise graphql.GraphQLError("Environment not found") from None

    def _service(self, environment_id: str, service_id: str) -> FakeService:
        services = self._environment(environment_id).services
        if service_id not in services:
            raise graphql.GraphQLError("Service not found")
        return services[service_id]

    # -- queries ----------------------------------------------------------------

    def environment(self, _info: Any, id: str, projectId: str | None = None) -> dict[str, Any]:
        environment = self._environment(id)

        def config(_info: Any, decryptVariables: bool = False) -> dict[str, Any]:
            services: dict[str, Any] = {}
            for service in environment.services.values():
                deploy: dict[str, Any] = {
                    "sleepApplication": service.sleep_application,
                    "restartPolicyType": service.restart_policy,
                    "restartPolicyMaxRetries": service.restart_retries,
                    "multiRegionConfig": {r: {"numReplicas": n} for r, n in
                                          (service.regions or {service.region: service.num_replicas}).items()},
                }
                if self.fake.config_has_limits and service.limits:
                    deploy["limitOverride"] = {"containers": {
                        "cpu": service.limits.get("vCPUs"),
                        "memoryBytes": int(service.limits["memoryGB"] * GB) if "memoryGB" in service.limits else None,
                    }}
                services[service.id] = {
                    "deploy": deploy,
                    "variables": {k: {"value": v if decryptVariables else "*" * 8}
                                  for k, v in service.variables.items()},
                }
            return {"services": services}

        def service_instances(_info: Any, first: int | None = None, after: str | None = None,
                              **_: Any) -> dict[str, Any]:
            services = list(environment.services.values())
            start = int(after) if after else 0
            page = services[start:start + (first or 100)]
            end = start + len(page)
            return {
                "edges": [{"cursor": str(start + i + 1), "node": {
                    "id": f"si-{s.id}", "environmentId": environment.id, "serviceId": s.id, "serviceName": s.name,
                    "region": s.region,
                    # Railway's legacy field: wrong for multi-region services (one region's count only).
                    "numReplicas": next(iter(s.regions.values())) if s.regions else s.num_replicas,
                    "sleepApplication": s.sleep_application, "restartPolicyType": s.restart_policy,
                    "restartPolicyMaxRetries": s.restart_retries,
                }} for i, s in enumerate(page)],
                "pageInfo": {"hasNextPage": end < len(services), "endCursor": str(end),
                             "hasPreviousPage": start > 0, "startCursor": str(start)},
            }

        return {"id": environment.id, "name": environment.name, "projectId": environment.project_id,
                "config": config, "serviceInstances": service_instances}

    def serviceInstanceLimitOverride(self, _info: Any, environmentId: str, serviceId: str) -> Any:
        service = self._service(environmentId, serviceId)
        if not service.limits:
            return None
        containers: dict[str, Any] = {}
        if "vCPUs" in service.limits:
            containers["cpu"] = service.limits["vCPUs"]
        if "memoryGB" in service.limits:
            containers["memoryBytes"] = int(service.limits["memoryGB"] * GB)
        return {"containers": containers}

    def usage(self, _info: Any, measurements: list[str], projectId: str | None = None,
              **_: Any) -> list[dict[str, Any]]:
        return [row for row in self.fake.usage_rows
                if row["measurement"] in measurements and row["tags"].get("projectId", projectId) == projectId]

    # -- mutations --------------------------------------------------------------

    def serviceInstanceUpdate(self, _info: Any, serviceId: str, input: dict[str, Any],
                              environmentId: str | None = None) -> bool:
        if environmentId is None:
            raise graphql.GraphQLError("environmentId is required for this service")
        service = self._service(environmentId, serviceId)
        if "multiRegionConfig" in input:
            regions = {r: int(v["numReplicas"]) for r, v in input["multiRegionConfig"].items() if v is not None}
            service.regions = regions if len(regions) > 1 else None
            if len(regions) == 1:
                service.region, service.num_replicas = next(iter(regions.items()))
        if "numReplicas" in input:
            service.num_replicas = input["numReplicas"]
        if "sleepApplication" in input:
            service.sleep_application = input["sleepApplication"]
        if "restartPolicyType" in input:
            service.restart_policy = input["restartPolicyType"]
        if "restartPolicyMaxRetries" in input:
            service.restart_retries = input["restartPolicyMaxRetries"]
        return True

    def serviceInstanceLimitsUpdate(self, _info: Any, input: dict[str, Any]) -> bool:
        service = self._service(input["environmentId"], input["serviceId"])
        service.limits = {k: float(input[k]) for k in ("vCPUs", "memoryGB") if input.get(k) is not None}
        return True

    def variableCollectionUpsert(self, _info: Any, input: dict[str, Any]) -> bool:
        service = self._service(input["environmentId"], input["serviceId"])
        if self._environment(input["environmentId"]).project_id != input["projectId"]:
            raise graphql.GraphQLError("Project not found")
        if input.get("replace"):
            service.variables = {}
        service.variables.update({k: str(v) for k, v in input["variables"].items()})
        if not input.get("skipDeploys"):
            service.deployments += 1
            service.deploys_triggered_by_variables += 1
        return True

    def serviceInstanceDeployV2(self, _info: Any, environmentId: str, serviceId: str,
                                commitSha: str | None = None) -> str:
        service = self._service(environmentId, serviceId)
        service.deployments += 1
        return f"deployment-{service.id}-{service.deployments}"


@contextlib.contextmanager
def fake_in_thread(fake: FakeRailway) -> Iterator[FakeRailway]:
    """The fake on its own event loop in a thread, for code under test that runs asyncio.run itself."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
