"""Month-to-date usage documents of one tenant, for its page, from the source the report and the
billing close read (MongoDB's tenantUsage, else the proxies' Redis hashes).

Hours before the previous one no longer change: they are read once, for all
tenants, and kept folded into one document per tenant, day and tier (the tier
keeps the bill's attribution exact; the day is what the chart shows). A page view
then reads only the last two hours. A new month starts afresh.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import Any, Protocol

from dynabase.desired.charges import month_hours

KEPT = ("queries", "query_seconds", "connections", "rejected_connections", "rejected", "throttled")


class Rollups(Protocol):
    async def read(self, hours: range) -> list[dict[str, Any]]: ...


class MonthDocs:
    def __init__(self, rollups: Rollups) -> None:
        self.rollups = rollups
        self._month: str | None = None
        self._final_through = -1  # the last hour folded in
        self._days: dict[tuple[str, int, str | None], dict[str, Any]] = {}
        self._lock = asyncio.Lock()  # two views folding the same hours would count them twice

    async def of(self, tenant: str, month: str, now: dt.datetime) -> list[dict[str, Any]]:
        hours = month_hours(month)
        current = min(int(now.timestamp()) // 3600, hours.stop - 1)
        async with self._lock:
            if self._month != month:
                self._month, self._final_through, self._days = month, hours.start - 1, {}
            final = range(self._final_through + 1, current - 1)
            if len(final):
                for doc in await self.rollups.read(final):
                    self._fold(doc)
                self._final_through = final.stop - 1
        recent = await self.rollups.read(range(max(hours.start, current - 1), current + 1))
        kept = [dict(doc) for (owner, _day, _tier), doc in self._days.items() if owner == tenant]
        return kept + [dict(doc) for doc in recent if doc.get("tenant") == tenant]

    def _fold(self, doc: Mapping[str, Any]) -> None:
        tenant, hour = str(doc["tenant"]), int(doc["hour"])
        tier = str(doc["tier"]) if doc.get("tier") else None
        day_hour = hour - hour % 24
        folded = self._days.setdefault((tenant, day_hour, tier), {"tenant": tenant, "hour": day_hour, "tier": tier})
        for name in KEPT:
            value = doc.get(name, 0)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                folded[name] = folded.get(name, 0) + value
