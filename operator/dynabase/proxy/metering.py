"""Usage per tenant, aggregated in-process and flushed about once a second.

A flush writes, per tenant and hour, this replica's *cumulative* counters for
that hour (HSET of absolute values, not HINCRBY), so a retried or repeated
flush can never count twice; readers sum the replicas' fields.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

USAGE_KEY = "dynabase:usage:{hour}"  # hash: "<tenant>|<replica>" -> JSON counters


@dataclass
class Usage:
    tenant: str
    tier: str
    queries: int = 0
    query_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    throttled: int = 0
    rejected: int = 0
    rejected_connections: int = 0
    hour: int = 0

    FIELDS = ("queries", "query_seconds", "bytes_in", "bytes_out", "connections", "throttled", "rejected",
              "rejected_connections")

    def snapshot(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.FIELDS}


class HourlyMeter:
    """Turns the ever-growing in-process counters into per-hour cumulative values."""

    def __init__(self) -> None:
        self.base: dict[tuple[str, int], dict[str, float]] = {}

    def per_hour(self, usage: Usage, now: float | None = None) -> tuple[int, dict[str, float]]:
        hour = int((now or time.time()) // 3600)
        key = (usage.tenant, hour)
        current = usage.snapshot()
        if key not in self.base:
            # A new hour starts from what the counters say now.
            previous = self.base.get((usage.tenant, hour - 1))
            self.base[key] = current if previous is not None else {k: 0 for k in current}
            self.base.pop((usage.tenant, hour - 2), None)
        base = self.base[key]
        return hour, {k: round(current[k] - base[k], 6) for k in current}


def usage_field(tenant: str, replica: str) -> str:
    return f"{tenant}|{replica}"


def encode(values: dict[str, float], tier: str) -> str:
    return json.dumps({**values, "tier": tier}, sort_keys=True, separators=(",", ":"))
