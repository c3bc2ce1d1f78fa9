"""Usage per tenant, aggregated in-process and flushed about once a second.

A flush writes, per tenant and hour, this replica's *cumulative* counters for
that hour (HSET of absolute values, not HINCRBY), so a retried or repeated
flush can never count twice; readers sum the replicas' fields (names and JSON:
dynabase.keyspace).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    statement_timeouts: int = 0  # statements the proxy cancelled at the tier's statementTimeout (57014)

    FIELDS = ("queries", "query_seconds", "bytes_in", "bytes_out", "connections", "throttled", "rejected",
              "rejected_connections", "statement_timeouts")

    def snapshot(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.FIELDS}


def _since(current: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {k: round(current[k] - base[k], 6) for k in current}


class HourlyMeter:
    """Turns the ever-growing in-process counters into per-hour cumulative values.

    What was counted between an hour's last flush and the next hour's first one belongs to
    the hour that ended: that hour is written once more, with its final values, until a
    flush of it succeeds (``flushed``). The last ended hour is kept too, so that it can be
    written again if Redis loses what it had (``again``)."""

    def __init__(self) -> None:
        self.base: dict[str, tuple[int, dict[str, float]]] = {}  # tenant -> (hour, counters when it began)
        self.closed: dict[str, list[tuple[int, dict[str, float]]]] = {}  # tenant -> ended hours not yet flushed
        self.previous: dict[str, tuple[int, dict[str, float]]] = {}  # tenant -> the last ended hour, final

    def per_hour(self, usage: Usage, now: float, *, again: bool = False) -> list[tuple[int, dict[str, float]]]:
        """(hour, counters in it) to write now for this tenant: the current hour, any ended one not
        yet flushed, and with ``again`` the last ended hour even if it was."""
        hour = int(now // 3600)
        current = usage.snapshot()
        began = self.base.get(usage.tenant)
        if began is None:
            began = self.base[usage.tenant] = (hour, {k: 0 for k in current})
        elif began[0] != hour:
            ended = self.previous[usage.tenant] = (began[0], _since(current, began[1]))
            self.closed.setdefault(usage.tenant, []).append(ended)
            began = self.base[usage.tenant] = (hour, current)
        closed = self.closed.get(usage.tenant, [])
        previous = self.previous.get(usage.tenant)
        rewrite = [previous] if again and previous is not None and previous not in closed else []
        return [*rewrite, *closed, (hour, _since(current, began[1]))]

    def flushed(self) -> None:
        """Everything per_hour returned so far is stored."""
        self.closed.clear()
