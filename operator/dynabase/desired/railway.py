"""Railway services: the declared shape of a service, what Railway reports, and the plan between them.

Observation reads a whole environment at once (its serialized config plus the
service instances), because Railway's rate limits are per request: one read per
environment, not one per service. The plan is a handful of mutations per
service: one ``serviceInstanceUpdate`` for replicas/sleep/restart policy, one
``serviceInstanceLimitsUpdate``, one ``variableCollectionUpsert`` with
``skipDeploys`` and then a single deploy, only for what drifted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .effective import EffectiveLimits

REPLICAS_FIELD = "multiRegionConfig"


@dataclass(frozen=True)
class ServiceRef:
    project_id: str
    environment_id: str
    service_name: str

    def __str__(self) -> str:
        return f"{self.environment_id}/{self.service_name}"


@dataclass(frozen=True)
class ServiceTarget:
    owner: str  # the tenant key, or "platform/<name>" for the platform's own services
    ref: ServiceRef
    replicas: int
    sleep_application: bool
    v_cpus: float | None = None
    memory_gb: float | None = None
    restart_policy: str | None = None
    restart_policy_max_retries: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)
    secret_variables: frozenset[str] = frozenset()


def tenant_service_target(
    owner: str, ref: ServiceRef, database: str, limits: EffectiveLimits, *,
    password: str | None, pg_host: str | None = None, pg_port: int | None = None,
) -> ServiceTarget:
    """A tenant's dedicated service: its tier's railway section, and how to reach its database."""
    variables = {"DYNABASE_TENANT": owner, "DYNABASE_TIER": limits.tier, "PGDATABASE": database, "PGUSER": database}
    if pg_host:
        variables["PGHOST"] = pg_host
    if pg_port:
        variables["PGPORT"] = str(pg_port)
    secret: frozenset[str] = frozenset()
    if password is not None:
        variables["PGPASSWORD"] = password
        secret = frozenset({"PGPASSWORD"})
    railway = limits.railway
    return ServiceTarget(
        owner=owner, ref=ref, replicas=railway.replicas, sleep_application=railway.sleep_application,
        v_cpus=railway.v_cpus, memory_gb=railway.memory_gb, restart_policy=railway.restart_policy,
        restart_policy_max_retries=railway.restart_policy_max_retries,
        variables=variables, secret_variables=secret,
    )


@dataclass(frozen=True)
class ServiceObserved:
    service_id: str
    name: str
    region: str | None = None
    regions: Mapping[str, int] = field(default_factory=dict)  # multiRegionConfig: replicas per region
    legacy_replicas: int | None = None
    sleep_application: bool | None = None
    restart_policy: str | None = None
    restart_policy_max_retries: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)
    v_cpus: float | None = None
    memory_gb: float | None = None

    @property
    def replicas(self) -> int | None:
        # The legacy numReplicas reads back wrong for multi-region services; the regions are the truth.
        if self.regions:
            return sum(self.regions.values())
        return self.legacy_replicas


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _replicas_by_region(deploy: Mapping[str, Any]) -> dict[str, int]:
    config = deploy.get(REPLICAS_FIELD)
    if not isinstance(config, Mapping):
        return {}
    regions: dict[str, int] = {}
    for region, value in config.items():
        if isinstance(value, Mapping) and isinstance(value.get("numReplicas"), int):
            regions[str(region)] = int(value["numReplicas"])
    return regions


def parse_environment(config: Mapping[str, Any], instances: Sequence[Mapping[str, Any]]) -> dict[str, ServiceObserved]:
    """Services of one environment by name, from ``environment.config`` and its service instances."""
    services = _mapping(config.get("services") if isinstance(config, Mapping) else None)
    observed: dict[str, ServiceObserved] = {}
    for instance in instances:
        service_id = str(instance["serviceId"])
        entry = _mapping(services.get(service_id))
        deploy = _mapping(entry.get("deploy"))
        raw_variables = _mapping(entry.get("variables"))
        variables = {
            str(name): str(value["value"])
            for name, value in raw_variables.items()
            if isinstance(value, Mapping) and value.get("value") is not None
        }
        v_cpus, memory_gb = parse_limits(deploy.get("limitOverride"))
        observed[str(instance["serviceName"])] = ServiceObserved(
            service_id=service_id,
            name=str(instance["serviceName"]),
            region=instance.get("region"),
            regions=_replicas_by_region(deploy),
            legacy_replicas=instance.get("numReplicas"),
            sleep_application=deploy.get("sleepApplication", instance.get("sleepApplication")),
            restart_policy=deploy.get("restartPolicyType", instance.get("restartPolicyType")),
            restart_policy_max_retries=deploy.get("restartPolicyMaxRetries", instance.get("restartPolicyMaxRetries")),
            variables=variables,
            v_cpus=v_cpus,
            memory_gb=memory_gb,
        )
    return observed


GB = 1_000_000_000


def parse_limits(value: Any) -> tuple[float | None, float | None]:
    """vCPUs and memory GB from a limit override (``{"containers": {"cpu", "memoryBytes"}}``)."""
    if not isinstance(value, Mapping):
        return None, None
    containers = value.get("containers", value)
    if not isinstance(containers, Mapping):
        return None, None
    cpu = containers.get("cpu", containers.get("vCPUs"))
    memory = containers.get("memoryBytes")
    memory_gb = float(memory) / GB if isinstance(memory, int | float) else containers.get("memoryGB")
    return (float(cpu) if isinstance(cpu, int | float) else None,
            float(memory_gb) if isinstance(memory_gb, int | float) else None)


def spread_replicas(total: int, regions: Mapping[str, int]) -> dict[str, int]:
    """``total`` replicas over the service's regions, in proportion to what each has now."""
    names = sorted(regions)
    have = sum(regions.values())
    weights = {r: (regions[r] / have if have else 1 / len(names)) for r in names}
    exact = {r: total * weights[r] for r in names}
    result = {r: int(exact[r]) for r in names}
    # Largest remainders get the replicas that rounding down left over.
    for region in sorted(names, key=lambda r: (-(exact[r] - result[r]), r))[: total - sum(result.values())]:
        result[region] += 1
    return result


def _differs(want: float | None, have: float | None) -> bool:
    return want is not None and (have is None or abs(want - have) > 1e-9)


@dataclass
class ServicePlan:
    target: ServiceTarget
    observed: ServiceObserved
    update: dict[str, Any] = field(default_factory=dict)  # ServiceInstanceUpdateInput fields
    limits: dict[str, float] | None = None  # ServiceInstanceLimitsUpdateInput vCPUs/memoryGB
    variables: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def deploy(self) -> bool:
        """Settings and variables take effect on the next deployment: one deploy for all of them."""
        return bool(self.update or self.variables or self.limits)

    @property
    def mutations(self) -> int:
        return bool(self.update) + bool(self.limits) + bool(self.variables) + self.deploy

    def lines(self) -> list[str]:
        """What would change, for plans and logs: names of secret variables, never their values."""
        observed, target, lines = self.observed, self.target, []
        if REPLICAS_FIELD in self.update or "numReplicas" in self.update:
            lines.append(f"replicas {observed.replicas} -> {target.replicas}")
        if "sleepApplication" in self.update:
            lines.append(f"sleepApplication {observed.sleep_application} -> {target.sleep_application}")
        if "restartPolicyType" in self.update or "restartPolicyMaxRetries" in self.update:
            lines.append(f"restart policy {observed.restart_policy}/{observed.restart_policy_max_retries} -> "
                         f"{target.restart_policy}/{target.restart_policy_max_retries}")
        if self.limits:
            lines.append(f"limits vCPUs {observed.v_cpus} -> {target.v_cpus}, "
                         f"memory GB {observed.memory_gb} -> {target.memory_gb}")
        if self.variables:
            shown = [f"{k} (secret)" if k in target.secret_variables else f"{k}={v}"
                     for k, v in sorted(self.variables.items())]
            lines.append("variables " + ", ".join(shown) + " (upsert, deploys skipped)")
        if self.deploy:
            lines.append("deploy once")
        return [f"service {target.ref}: {line}" for line in lines]


def plan_service(target: ServiceTarget, observed: ServiceObserved) -> ServicePlan:
    plan = ServicePlan(target, observed)
    if observed.replicas != target.replicas:
        if observed.regions:
            plan.update[REPLICAS_FIELD] = {
                region: {"numReplicas": n} for region, n in spread_replicas(target.replicas, observed.regions).items()
            }
        elif observed.region:
            plan.update[REPLICAS_FIELD] = {observed.region: {"numReplicas": target.replicas}}
        else:
            plan.update["numReplicas"] = target.replicas
    if observed.sleep_application is not target.sleep_application:
        plan.update["sleepApplication"] = target.sleep_application
    if target.restart_policy is not None and target.restart_policy != observed.restart_policy:
        plan.update["restartPolicyType"] = target.restart_policy
    if (target.restart_policy_max_retries is not None
            and target.restart_policy_max_retries != observed.restart_policy_max_retries):
        plan.update["restartPolicyMaxRetries"] = target.restart_policy_max_retries
    if _differs(target.v_cpus, observed.v_cpus) or _differs(target.memory_gb, observed.memory_gb):
        plan.limits = {}
        if target.v_cpus is not None:
            plan.limits["vCPUs"] = target.v_cpus
        if target.memory_gb is not None:
            plan.limits["memoryGB"] = target.memory_gb
    plan.variables = {k: v for k, v in target.variables.items() if observed.variables.get(k) != v}
    return plan
