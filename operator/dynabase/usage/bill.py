"""Where the month's real infrastructure bill comes from.

``BillSource`` is what the report needs; the Railway GraphQL client (the usage
query's CPU_USAGE, MEMORY_USAGE_GB and estimated cost for the database service)
will be one. ``StaticBillSource`` reads the figures from a YAML or JSON file:

    "2026-10": {cpuVcpuSeconds: 1800000, memoryGbSeconds: 5200000, costUSD: 412.50, cpuCostUSD: 300}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import yaml

from dynabase.desired.cost import BillMeasurement

__all__ = ["BillMeasurement", "BillSource", "BillUnavailable", "StaticBillSource"]


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
