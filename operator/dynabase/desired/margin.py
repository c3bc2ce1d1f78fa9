"""The monthly report's arithmetic: revenue from the priced months, the bill's cost
attributed to tenants, gross margin. Pure.

Revenue is exactly what the billing close invoices: vCPU-hours from the model in
force and the prorated tiers (``dynabase.desired.charges``). The bill only
calibrates — how far the model was from the CPU really used — and decides cost;
it never reprices a month already judged and invoiced with the stored model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .charges import TenantMonth
from .cost import (
    CALIBRATION_TOLERANCE,
    SECONDS_PER_HOUR,
    BillMeasurement,
    Calibration,
    calibrate,
    warning_level,
)

MARGIN_TARGET = 0.70  # gross margin below this flags a tenant or tier


@dataclass(frozen=True)
class Line:
    """A tenant, a tier's total or the overall total."""

    name: str
    tier: str
    queries: float
    vcpu_hours: float  # by the model in force: what the engine judged and the invoice charges
    vcpu_hours_calibrated: float  # times the bill's calibration factor (vcpu_hours without a bill)
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


def _sum_lines(name: str, tier: str, lines: Sequence[Line]) -> Line:
    costs = [line.cost_usd for line in lines]
    return Line(
        name=name, tier=tier, queries=sum(line.queries for line in lines),
        vcpu_hours=sum(line.vcpu_hours for line in lines),
        vcpu_hours_calibrated=sum(line.vcpu_hours_calibrated for line in lines),
        included_vcpu_hours=sum(line.included_vcpu_hours for line in lines),
        overage_vcpu_hours=sum(line.overage_vcpu_hours for line in lines),
        base_fee_usd=sum(line.base_fee_usd for line in lines),
        overage_usd=sum(line.overage_usd for line in lines),
        cost_usd=None if any(c is None for c in costs) else sum(c for c in costs if c is not None),
    )


def build_report(months: Sequence[TenantMonth], bill: BillMeasurement | None,
                 tolerance: float = CALIBRATION_TOLERANCE) -> Report:
    """Per tenant: vCPU-hours (as billed, and calibrated), included and overage hours,
    base fee and overage, attributed cost and margin; then per tier and overall.

    Cost attribution: the CPU part of the bill by each tenant's share of the CPU
    estimate; the rest (memory, disk, egress, idle) evenly over the tenants reported.
    """
    total_cpu = sum(m.estimate.cpu_seconds for m in months)
    total_memory = sum(m.estimate.memory_gb_seconds for m in months)
    calibration = calibrate(bill.cpu_vcpu_seconds, total_cpu, tolerance) if bill else None
    factor = calibration.factor if calibration else 1.0
    memory_factor = None
    if bill is not None and total_memory > 0:
        memory_factor = bill.memory_gb_seconds / total_memory
    cpu_cost = cost_rest = 0.0
    if bill is not None:
        cpu_cost = bill.cost_usd if bill.cpu_cost_usd is None else min(bill.cpu_cost_usd, bill.cost_usd)
        cost_rest = bill.cost_usd - cpu_cost
        if total_cpu * factor <= 0:
            cost_rest, cpu_cost = bill.cost_usd, 0.0  # no CPU to follow: all of it evenly

    tenants: list[Line] = []
    warnings: list[UsageWarning] = []
    included_ratio: dict[str, float] = {}
    for month in months:
        cost = None
        if bill is not None:
            share = month.estimate.cpu_seconds / total_cpu if total_cpu > 0 else 0.0
            cost = cpu_cost * share + cost_rest / len(months)
        hours, included = month.vcpu_hours, month.included_vcpu_hours
        tenants.append(Line(
            name=month.tenant, tier=month.tier, queries=month.usage.queries,
            vcpu_hours=hours, vcpu_hours_calibrated=month.estimate.cpu_seconds * factor / SECONDS_PER_HOUR,
            included_vcpu_hours=included, overage_vcpu_hours=month.overage_vcpu_hours,
            base_fee_usd=month.base_fee_usd, overage_usd=month.overage_usd, cost_usd=cost,
        ))
        if included > 0:
            included_ratio[month.tenant] = hours / included
        level = warning_level(hours, included)
        if level is not None:
            warnings.append(UsageWarning(month.tenant, month.tier, level, hours, included))

    by_tier: dict[str, list[Line]] = {}
    for line in tenants:
        by_tier.setdefault(line.tier, []).append(line)
    tiers = [_sum_lines(tier, tier, lines) for tier, lines in sorted(by_tier.items())]
    return Report(
        tenants=sorted(tenants, key=lambda line: (line.tier, line.name)), tiers=tiers,
        total=_sum_lines("all", "", tenants), warnings=warnings, calibration=calibration,
        memory_factor=memory_factor, bill=bill, included_ratio=included_ratio,
    )
