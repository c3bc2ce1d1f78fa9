"""What a tenant's usage costs: the CPU model, its versions and its calibration.
Pure: callers bring the figures, nothing is read here (``dynabase.desired.charges``
prices a month, ``dynabase.desired.margin`` is the report's arithmetic).

The proxy sees queries and their wall time, not CPU. The model turns them into
vCPU-seconds with two named coefficients,

    cpu_seconds = cpu_per_query_second * query_seconds + cpu_per_query * queries

(the first is the busy share of a query's wall time, the second what parsing,
planning and the round trip cost the backend whatever the query does). Memory
GB-seconds follow the same shape from query time and connections. Coefficients
are fitted (``fit_cpu``) on the database host against the backends' measured CPU,
a per-tenant factor may correct a tenant whose queries the model fits badly, and
once a month ``calibrate`` scales everything to the CPU on the real bill. Each
refit or calibration is stored as a new version (``FittedModel``) that the engine,
the report and the billing close all read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SECONDS_PER_HOUR = 3600.0
CALIBRATION_TOLERANCE = 0.20  # |factor - 1| above this means the model no longer matches the bill
WARNING_LEVELS = (1.0, 0.8)  # share of included vCPU-hours; reported as "100" and "80"


@dataclass(frozen=True)
class UsageTotals:
    """A tenant's proxy counters summed over a period."""

    queries: float = 0.0
    query_seconds: float = 0.0
    connections: float = 0.0

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(self.queries + other.queries, self.query_seconds + other.query_seconds,
                           self.connections + other.connections)


@dataclass(frozen=True)
class CostModel:
    # Defaults: fitted by `python -m bench.attribution` on the devstack (2 shared cores),
    # where the per-query term came out at zero; refit on the database host
    # (--write-model), the monthly calibration absorbs what remains.
    cpu_per_query_second: float = 0.42
    cpu_per_query: float = 0.0
    # Memory: private memory of a running query (work_mem, sorts) and of an open
    # session (about 10 MB held for about a minute); rough, calibrated monthly.
    memory_gb_per_query_second: float = 0.02
    memory_gb_seconds_per_connection: float = 0.6


@dataclass(frozen=True)
class Estimate:
    cpu_seconds: float
    memory_gb_seconds: float


def estimate(usage: UsageTotals, model: CostModel, tenant_factor: float = 1.0) -> Estimate:
    cpu = model.cpu_per_query_second * usage.query_seconds + model.cpu_per_query * usage.queries
    memory = (model.memory_gb_per_query_second * usage.query_seconds
              + model.memory_gb_seconds_per_connection * usage.connections)
    return Estimate(cpu * tenant_factor, memory * tenant_factor)


@dataclass(frozen=True)
class FittedModel:
    """The cost model in force: coefficients and per-tenant factors, as one stored version.

    The engine's usage judgment, the usage report and the billing close all turn
    usage into vCPU-hours through ``vcpu_hours`` of the same version, so a
    restriction, a report and an invoice agree. Version 0 is the built-in defaults.
    """

    model: CostModel = field(default_factory=CostModel)
    tenant_factors: Mapping[str, float] = field(default_factory=dict)
    version: int = 0
    source: str = "built-in defaults"

    def factor(self, tenant: str) -> float:
        return self.tenant_factors.get(tenant, 1.0)

    def estimate(self, tenant: str, usage: UsageTotals) -> Estimate:
        return estimate(usage, self.model, self.factor(tenant))

    def vcpu_hours(self, tenant: str, usage: UsageTotals) -> float:
        return self.estimate(tenant, usage).cpu_seconds / SECONDS_PER_HOUR

    def scaled(self, cpu_factor: float, memory_factor: float | None) -> CostModel:
        """The coefficients times a calibration's factors (memory unchanged without one)."""
        memory = 1.0 if memory_factor is None else memory_factor
        return CostModel(self.model.cpu_per_query_second * cpu_factor, self.model.cpu_per_query * cpu_factor,
                         self.model.memory_gb_per_query_second * memory,
                         self.model.memory_gb_seconds_per_connection * memory)


# The model's document (a file from bench.attribution, a ConfigMap, the stored row's JSON): camelCase keys.
MODEL_KEYS = {
    "cpuPerQuerySecond": "cpu_per_query_second",
    "cpuPerQuery": "cpu_per_query",
    "memoryGbPerQuerySecond": "memory_gb_per_query_second",
    "memoryGbSecondsPerConnection": "memory_gb_seconds_per_connection",
}


def _non_negative(value: object, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0) \
            or not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a number {'> 0' if positive else '>= 0'}")
    return float(value)


def model_from_document(doc: Mapping[str, object], where: str) -> tuple[CostModel, dict[str, float]]:
    """Coefficients (defaults for those absent) and tenant factors; ValueError names the key and value."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: expected a mapping of {', '.join(MODEL_KEYS)}, tenantFactors")
    unknown = set(doc) - set(MODEL_KEYS) - {"tenantFactors"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(MODEL_KEYS)}, tenantFactors")
    values = {attr: _non_negative(doc[key], f"{where}: {key}") for key, attr in MODEL_KEYS.items() if key in doc}
    raw_factors = doc.get("tenantFactors") or {}
    if not isinstance(raw_factors, Mapping):
        raise ValueError(f"{where}: tenantFactors must map namespace/name to a number > 0")
    factors = {str(tenant): _non_negative(value, f"{where}: tenantFactors.{tenant}", positive=True)
               for tenant, value in raw_factors.items()}
    return CostModel(**values), factors


def model_document(model: CostModel, tenant_factors: Mapping[str, float]) -> dict[str, object]:
    doc: dict[str, object] = {key: getattr(model, attr) for key, attr in MODEL_KEYS.items()}
    if tenant_factors:
        doc["tenantFactors"] = dict(tenant_factors)
    return doc


def _weight(cpu: float, relative: bool) -> float:
    return 1.0 / (cpu * cpu) if relative and cpu > 0 else 1.0


def _squared_error(samples: Sequence[tuple[UsageTotals, float]], a: float, b: float, relative: bool) -> float:
    return sum(_weight(cpu, relative) * (a * u.query_seconds + b * u.queries - cpu) ** 2 for u, cpu in samples)


def fit_cpu(samples: Sequence[tuple[UsageTotals, float]], base: CostModel | None = None, *,
            relative: bool = True) -> CostModel:
    """Least squares of measured CPU seconds on (query_seconds, queries), no intercept
    (no queries, no tenant CPU), both coefficients kept non-negative.

    ``relative`` minimises the squared *relative* error (weights 1/cpu²), so that a
    small tenant's estimate counts as much as a large one's; plain least squares
    would fit the biggest tenant and leave the small ones far off.
    Memory coefficients are taken from ``base``: the host measures CPU per backend,
    not memory, so those stay for the monthly calibration to correct.
    """
    base = base or CostModel()
    if not samples:
        raise ValueError("fit_cpu needs at least one (usage, measured CPU) pair")
    weighted = [(u, cpu, _weight(cpu, relative)) for u, cpu in samples]
    s11 = sum(w * u.query_seconds ** 2 for u, _, w in weighted)
    s12 = sum(w * u.query_seconds * u.queries for u, _, w in weighted)
    s22 = sum(w * u.queries ** 2 for u, _, w in weighted)
    t1 = sum(w * u.query_seconds * cpu for u, cpu, w in weighted)
    t2 = sum(w * u.queries * cpu for u, cpu, w in weighted)
    candidates: list[tuple[float, float]] = []
    det = s11 * s22 - s12 * s12
    # Relative test: the features differ in scale by orders of magnitude.
    if det > 1e-12 * s11 * s22:
        a, b = (t1 * s22 - t2 * s12) / det, (t2 * s11 - t1 * s12) / det
        if a >= 0 and b >= 0:
            candidates.append((a, b))
    # Collinear or a negative coefficient: the best fit with one of them at zero.
    if s11 > 0:
        candidates.append((max(t1 / s11, 0.0), 0.0))
    if s22 > 0:
        candidates.append((0.0, max(t2 / s22, 0.0)))
    if not candidates:
        raise ValueError("fit_cpu needs usage with queries or query time")
    a, b = min(candidates, key=lambda ab: _squared_error(samples, ab[0], ab[1], relative))
    return CostModel(cpu_per_query_second=a, cpu_per_query=b,
                     memory_gb_per_query_second=base.memory_gb_per_query_second,
                     memory_gb_seconds_per_connection=base.memory_gb_seconds_per_connection)


def tenant_factors(samples: Mapping[str, tuple[UsageTotals, float]], model: CostModel,
                   *, min_cpu_seconds: float = 1.0) -> dict[str, float]:
    """measured / estimated per tenant, for tenants with enough CPU to say (others keep 1)."""
    out: dict[str, float] = {}
    for tenant, (usage, measured) in samples.items():
        estimated = estimate(usage, model).cpu_seconds
        if measured >= min_cpu_seconds and estimated > 0:
            out[tenant] = measured / estimated
    return out


# -- the monthly bill ---------------------------------------------------------------


@dataclass(frozen=True)
class BillMeasurement:
    """What the infrastructure bill says the database service used and cost in a month.

    ``cpu_cost_usd`` is the part of ``cost_usd`` that CPU accounts for, when the
    bill itemises it; the rest (memory, disk, egress) is not driven by any one
    tenant's queries and is split evenly. Without it the whole cost follows CPU.
    """

    cpu_vcpu_seconds: float
    memory_gb_seconds: float
    cost_usd: float
    cpu_cost_usd: float | None = None


@dataclass(frozen=True)
class Calibration:
    factor: float
    variance_ratio: float
    alert: bool


def calibrate(measured_cpu_seconds: float, estimated_cpu_seconds: float,
              tolerance: float = CALIBRATION_TOLERANCE) -> Calibration:
    """The factor that makes the month's estimates add up to the bill's CPU."""
    if estimated_cpu_seconds <= 0:
        # Nothing estimated but CPU billed: no factor can explain it, which is itself the alert.
        return Calibration(1.0, 0.0 if measured_cpu_seconds <= 0 else math.inf, measured_cpu_seconds > 0)
    factor = measured_cpu_seconds / estimated_cpu_seconds
    variance = abs(factor - 1.0)
    return Calibration(factor, variance, variance > tolerance)


def warning_level(vcpu_hours: float, included_vcpu_hours: float) -> str | None:
    """The highest threshold reached; tenants with nothing included get no warning."""
    if included_vcpu_hours <= 0:
        return None
    for level in WARNING_LEVELS:
        if vcpu_hours >= level * included_vcpu_hours:
            return str(round(level * 100))
    return None


def usage_by_tenant(rollups: Sequence[Mapping[str, object]]) -> dict[str, tuple[UsageTotals, str | None]]:
    """Hourly rollup documents (``dynabase.desired.mongo.rollup``, or tenantUsage) summed per
    tenant over the period, with the tier of the tenant's latest hour."""
    totals: dict[str, UsageTotals] = {}
    latest: dict[str, tuple[int, str | None]] = {}

    def number(doc: Mapping[str, object], key: str) -> float:
        value = doc.get(key, 0)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0

    for doc in rollups:
        tenant = str(doc["tenant"])
        totals[tenant] = totals.get(tenant, UsageTotals()) + UsageTotals(
            number(doc, "queries"), number(doc, "query_seconds"), number(doc, "connections"))
        hour = int(number(doc, "hour"))
        tier = doc.get("tier")
        if tenant not in latest or hour >= latest[tenant][0]:
            latest[tenant] = (hour, str(tier) if tier is not None else None)
    return {tenant: (usage, latest[tenant][1]) for tenant, usage in totals.items()}
