"""What a tenant's usage costs and earns: the CPU model, its calibration and the
monthly report's arithmetic. Pure: callers bring the figures, nothing is read here.

The proxy sees queries and their wall time, not CPU. The model turns them into
vCPU-seconds with two named coefficients,

    cpu_seconds = cpu_per_query_second * query_seconds + cpu_per_query * queries

(the first is the busy share of a query's wall time, the second what parsing,
planning and the round trip cost the backend whatever the query does). Memory
GB-seconds follow the same shape from query time and connections. Coefficients
are fitted (``fit_cpu``) on the database host against the backends' measured CPU,
a per-tenant factor may correct a tenant whose queries the model fits badly, and
once a month ``calibrate`` scales everything to the CPU on the real bill.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .effective import BillingEffective

SECONDS_PER_HOUR = 3600.0
MARGIN_TARGET = 0.70  # gross margin below this flags a tenant or tier
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


# -- the report ---------------------------------------------------------------------


@dataclass(frozen=True)
class TenantInput:
    tenant: str
    tier: str
    usage: UsageTotals
    billing: BillingEffective
    tenant_factor: float = 1.0


@dataclass(frozen=True)
class Line:
    """A tenant, a tier's total or the overall total."""

    name: str
    tier: str
    queries: float
    vcpu_hours_estimated: float
    vcpu_hours: float  # calibrated
    included_vcpu_hours: float
    overage_vcpu_hours: float
    base_fee_usd: float
    overage_usd: float
    cost_usd: float | None  # None: no bill to attribute

    @property
    def revenue_usd(self) -> float:
        return self.base_fee_usd + self.overage_usd

    @property
    def margin(self) -> float | None:
        """(revenue - cost) / revenue; None when undefined (no bill, or neither revenue nor cost)."""
        if self.cost_usd is None:
            return None
        if self.revenue_usd > 0:
            return (self.revenue_usd - self.cost_usd) / self.revenue_usd
        return -math.inf if self.cost_usd > 0 else None

    @property
    def below_target(self) -> bool:
        margin = self.margin
        return margin is not None and margin < MARGIN_TARGET


@dataclass(frozen=True)
class UsageWarning:
    tenant: str
    tier: str
    level: str  # "80" or "100"
    vcpu_hours: float
    included_vcpu_hours: float


@dataclass(frozen=True)
class Report:
    tenants: list[Line]
    tiers: list[Line]
    total: Line
    warnings: list[UsageWarning]
    calibration: Calibration | None
    memory_factor: float | None
    bill: BillMeasurement | None
    included_ratio: dict[str, float] = field(default_factory=dict)  # tenant -> used / included


def warning_level(vcpu_hours: float, included_vcpu_hours: float) -> str | None:
    """The highest threshold reached; tenants with nothing included get no warning."""
    if included_vcpu_hours <= 0:
        return None
    for level in WARNING_LEVELS:
        if vcpu_hours >= level * included_vcpu_hours:
            return str(round(level * 100))
    return None


def _sum_lines(name: str, tier: str, lines: Sequence[Line]) -> Line:
    costs = [line.cost_usd for line in lines]
    return Line(
        name=name, tier=tier, queries=sum(line.queries for line in lines),
        vcpu_hours_estimated=sum(line.vcpu_hours_estimated for line in lines),
        vcpu_hours=sum(line.vcpu_hours for line in lines),
        included_vcpu_hours=sum(line.included_vcpu_hours for line in lines),
        overage_vcpu_hours=sum(line.overage_vcpu_hours for line in lines),
        base_fee_usd=sum(line.base_fee_usd for line in lines),
        overage_usd=sum(line.overage_usd for line in lines),
        cost_usd=None if any(c is None for c in costs) else sum(c for c in costs if c is not None),
    )


def build_report(inputs: Sequence[TenantInput], model: CostModel, bill: BillMeasurement | None,
                 tolerance: float = CALIBRATION_TOLERANCE) -> Report:
    """Per tenant: estimated and calibrated vCPU-hours, included and overage hours,
    base fee and overage, attributed cost and margin; then per tier and overall.

    Cost attribution: the CPU part of the bill by each tenant's share of calibrated
    CPU; the rest (memory, disk, egress, idle) evenly over the tenants reported.
    """
    estimates = {i.tenant: estimate(i.usage, model, i.tenant_factor) for i in inputs}
    total_cpu = sum(e.cpu_seconds for e in estimates.values())
    total_memory = sum(e.memory_gb_seconds for e in estimates.values())
    calibration = calibrate(bill.cpu_vcpu_seconds, total_cpu, tolerance) if bill else None
    factor = calibration.factor if calibration else 1.0
    memory_factor = None
    if bill is not None and total_memory > 0:
        memory_factor = bill.memory_gb_seconds / total_memory
    calibrated_total = total_cpu * factor
    cpu_cost = cost_rest = 0.0
    if bill is not None:
        cpu_cost = bill.cost_usd if bill.cpu_cost_usd is None else min(bill.cpu_cost_usd, bill.cost_usd)
        cost_rest = bill.cost_usd - cpu_cost
        if calibrated_total <= 0:
            cost_rest, cpu_cost = bill.cost_usd, 0.0  # no CPU to follow: all of it evenly

    tenants: list[Line] = []
    warnings: list[UsageWarning] = []
    included_ratio: dict[str, float] = {}
    for item in inputs:
        est = estimates[item.tenant]
        seconds = est.cpu_seconds * factor
        hours = seconds / SECONDS_PER_HOUR
        billing = item.billing
        included = billing.included_vcpu_hours
        overage_hours = max(0.0, hours - included)
        price = billing.overage_per_vcpu_hour_usd
        cost = None
        if bill is not None:
            share = seconds / calibrated_total if calibrated_total > 0 else 0.0
            cost = cpu_cost * share + cost_rest / len(inputs)
        tenants.append(Line(
            name=item.tenant, tier=item.tier, queries=item.usage.queries,
            vcpu_hours_estimated=est.cpu_seconds / SECONDS_PER_HOUR, vcpu_hours=hours,
            included_vcpu_hours=included, overage_vcpu_hours=overage_hours,
            base_fee_usd=billing.base_fee_usd,
            overage_usd=overage_hours * price if price is not None else 0.0,  # no price: overage not sold
            cost_usd=cost,
        ))
        if included > 0:
            included_ratio[item.tenant] = hours / included
        level = warning_level(hours, included)
        if level is not None:
            warnings.append(UsageWarning(item.tenant, item.tier, level, hours, included))

    by_tier: dict[str, list[Line]] = {}
    for line in tenants:
        by_tier.setdefault(line.tier, []).append(line)
    tiers = [_sum_lines(tier, tier, lines) for tier, lines in sorted(by_tier.items())]
    return Report(
        tenants=sorted(tenants, key=lambda line: (line.tier, line.name)), tiers=tiers,
        total=_sum_lines("all", "", tenants), warnings=warnings, calibration=calibration,
        memory_factor=memory_factor, bill=bill, included_ratio=included_ratio,
    )


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
