"""Where the month's real infrastructure bill comes from.

``BillSource`` is what the report needs; the Railway GraphQL client (the usage
query's CPU_USAGE, MEMORY_USAGE_GB and estimated cost for the database service)
will be one. ``StaticBillSource`` reads the figures from a YAML or JSON file:

    "2026-10": {cpuVcpuSeconds: 1800000, memoryGbSeconds: 5200000, costUSD: 412.50, cpuCostUSD: 300}
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import yaml

from dynabase.desired.cost import BillMeasurement

__all__ = ["BillMeasurement", "BillSource", "BillUnavailable", "RailwayBillSource", "StaticBillSource"]

# Railway's published usage prices: $20 per vCPU and $10 per GB of memory for a
# 30-day month, charged per minute; its usage query reports vCPU- and GB-minutes.
MINUTES_PER_MONTH = 30 * 24 * 60
RAILWAY_USD_PER_VCPU_MINUTE = 20 / MINUTES_PER_MONTH
RAILWAY_USD_PER_GB_MINUTE = 10 / MINUTES_PER_MONTH


class BillUnavailable(LookupError):
    """No figures for that month."""


class BillSource(Protocol):
    async def measured(self, month: str) -> BillMeasurement:
        """The database service's CPU, memory and cost in ``month`` (YYYY-MM)."""
        ...


def _number(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: {key} must be a number >= 0")
    return float(value)


class StaticBillSource:
    def __init__(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of YYYY-MM to bill figures")
        self.months: dict[str, BillMeasurement] = {}
        for month, entry in raw.items():
            where = f"{path}: {month}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected cpuVcpuSeconds, memoryGbSeconds, costUSD")
            self.months[str(month)] = BillMeasurement(
                cpu_vcpu_seconds=_number(entry, "cpuVcpuSeconds", where),
                memory_gb_seconds=_number(entry, "memoryGbSeconds", where),
                cost_usd=_number(entry, "costUSD", where),
                cpu_cost_usd=_number(entry, "cpuCostUSD", where) if "cpuCostUSD" in entry else None,
            )

    async def measured(self, month: str) -> BillMeasurement:
        try:
            return self.months[month]
        except KeyError:
            raise BillUnavailable(f"no bill figures for {month}") from None


def month_bounds(month: str) -> tuple[dt.datetime, dt.datetime]:
    try:
        start = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"month {month!r}: expected YYYY-MM, for example 2026-10") from None
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


class Usage(Protocol):
    async def usage(self, project_id: str, start: dt.datetime, end: dt.datetime,
                    measurements: Iterable[str]) -> dict[str, dict[str, float]]: ...


class RailwayBillSource:
    """The database service's measured CPU and memory from Railway's ``usage`` query, priced
    at Railway's published rates (override them for a negotiated plan)."""

    def __init__(self, railway: Usage, project_id: str, service_id: str, *,
                 usd_per_vcpu_minute: float = RAILWAY_USD_PER_VCPU_MINUTE,
                 usd_per_gb_minute: float = RAILWAY_USD_PER_GB_MINUTE) -> None:
        self.railway, self.project_id, self.service_id = railway, project_id, service_id
        self.usd_per_vcpu_minute, self.usd_per_gb_minute = usd_per_vcpu_minute, usd_per_gb_minute

    async def measured(self, month: str) -> BillMeasurement:
        start, end = month_bounds(month)
        usage = await self.railway.usage(self.project_id, start, end, ["CPU_USAGE", "MEMORY_USAGE_GB"])
        service = usage.get(self.service_id)
        if not service:
            raise BillUnavailable(f"Railway reports no usage for service {self.service_id} in project "
                                  f"{self.project_id} in {month}")
        cpu_minutes, gb_minutes = service.get("CPU_USAGE", 0.0), service.get("MEMORY_USAGE_GB", 0.0)
        cpu_cost = cpu_minutes * self.usd_per_vcpu_minute
        return BillMeasurement(
            cpu_vcpu_seconds=cpu_minutes * 60, memory_gb_seconds=gb_minutes * 60,
            cost_usd=cpu_cost + gb_minutes * self.usd_per_gb_minute, cpu_cost_usd=cpu_cost,
        )
