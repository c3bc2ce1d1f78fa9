"""Each tenant's event history in Postgres (``dynabase.tenant_events``): what the engine announced
(usage at 80 %/100 %, Cold, tier changes, restrictions …), kept in both modes, bounded per tenant.

A pass's events are appended in one transaction together with their notifications
(``dynabase.notification_deliveries``, the outbox the delivery loop reads), and the
tenant's history is cut to its newest ``keep`` entries in the same transaction. An
event's id is derived from its content, so appending the same pass again adds nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import notify_pg
from .platform_schema import create_once, table_exists

TABLE = "dynabase.tenant_events"
KEEP_PER_TENANT = 200
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.tenant_events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant_key text NOT NULL,
    org_id text,
    database_name text,
    tier text,
    type text NOT NULL,
    reason text NOT NULL,
    message text NOT NULL,
    data jsonb NOT NULL DEFAULT '{}',
    at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS tenant_events_by_tenant ON dynabase.tenant_events (tenant_key, seq DESC);
CREATE INDEX IF NOT EXISTS tenant_events_by_time ON dynabase.tenant_events (at DESC);
"""


@dataclass(frozen=True)
class StoredEvent:
    id: str  # stable: the same event appended twice is stored once
    tenant: str  # namespace/name
    org_id: str | None
    database: str | None
    tier: str | None
    type: str  # Normal or Warning
    reason: str
    message: str
    at: dt.datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    delivery: str | None = None  # when read: the notification's state (delivered, pending, …), None if none

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "tenant": self.tenant, "orgId": self.org_id, "database": self.database, "tier": self.tier,
            "type": self.type, "reason": self.reason, "message": self.message, "at": self.at.isoformat(),
        }
        if self.data:
            out["data"] = dict(self.data)
        if self.delivery is not None:
            out["notification"] = self.delivery
        return out


class PostgresEventLog:
    def __init__(self, pool: asyncpg.Pool, *, keep: int = KEEP_PER_TENANT) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: a tenant's history keeps at least one event")
        self._pool = pool
        self.keep = keep
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            # Both tables in one transaction: where there is a history, there is its outbox.
            await create_once(self._pool, TABLE, _SCHEMA + notify_pg.SCHEMA)
            self._ready = True

    async def append(self, events: Sequence[StoredEvent], outbox: Sequence[notify_pg.OutboxEntry] = ()) -> int:
        """Store new events and their notifications at once; returns how many events were new."""
        if not events:
            return 0
        await self._ensure()
        tenants = sorted({e.tenant for e in events})
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetch(
                "INSERT INTO dynabase.tenant_events "
                "(id, tenant_key, org_id, database_name, tier, type, reason, message, data, at) "
                "SELECT id, tenant_key, org_id, database_name, tier, type, reason, message, data::jsonb, at "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], "
                "$8::text[], $9::text[], $10::timestamptz[]) "
                "AS e(id, tenant_key, org_id, database_name, tier, type, reason, message, data, at) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                [e.id for e in events], [e.tenant for e in events], [e.org_id for e in events],
                [e.database for e in events], [e.tier for e in events], [e.type for e in events],
                [e.reason for e in events], [e.message for e in events],
                [json.dumps(dict(e.data), sort_keys=True) for e in events], [e.at for e in events],
            )
            new = {row["id"] for row in inserted}
            # Only a new event is notified: an append repeated after a crash sends nothing twice.
            await notify_pg.enqueue(conn, [entry for entry in outbox if entry.event_id in new])
            await conn.execute(
                "DELETE FROM dynabase.tenant_events WHERE seq IN ("
                " SELECT seq FROM (SELECT seq, row_number() OVER (PARTITION BY tenant_key ORDER BY seq DESC) AS n"
                "  FROM dynabase.tenant_events WHERE tenant_key = ANY($1::text[])) ranked WHERE n > $2)",
                tenants, self.keep,
            )
        return len(new)

    async def recent(self, *, tenant: str | None = None, tenants: Sequence[str] | None = None,
                     since: dt.datetime | None = None, limit: int = 50) -> list[StoredEvent]:
        """Newest first, with each notification's state. Reading never creates the tables."""
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, TABLE):
                return []
            rows = await conn.fetch(
                "SELECT e.id, e.tenant_key, e.org_id, e.database_name, e.tier, e.type, e.reason, e.message, "
                "e.data::text AS data, e.at, d.status AS delivery, d.attempts "
                "FROM dynabase.tenant_events e LEFT JOIN dynabase.notification_deliveries d ON d.event_id = e.id "
                "WHERE ($1::text IS NULL OR e.tenant_key = $1) AND ($2::text[] IS NULL OR e.tenant_key = ANY($2)) "
                "AND ($3::timestamptz IS NULL OR e.at >= $3) ORDER BY e.seq DESC LIMIT $4",
                tenant, list(tenants) if tenants is not None else None, since, limit,
            )
        return [_event(r) for r in rows]

    async def latest(self, tenants: Sequence[str], per_tenant: int) -> dict[str, list[StoredEvent]]:
        """Each tenant's newest ``per_tenant`` events, newest first (one query for all of them)."""
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, TABLE):
                return {}
            rows = await conn.fetch(
                "SELECT * FROM (SELECT e.id, e.tenant_key, e.org_id, e.database_name, e.tier, e.type, e.reason, "
                " e.message, e.data::text AS data, e.at, e.seq, d.status AS delivery, d.attempts, "
                " row_number() OVER (PARTITION BY e.tenant_key ORDER BY e.seq DESC) AS n "
                " FROM dynabase.tenant_events e LEFT JOIN dynabase.notification_deliveries d ON d.event_id = e.id "
                " WHERE e.tenant_key = ANY($1::text[])) ranked WHERE n <= $2 ORDER BY tenant_key, seq DESC",
                list(tenants), per_tenant,
            )
        out: dict[str, list[StoredEvent]] = {}
        for r in rows:
            out.setdefault(r["tenant_key"], []).append(_event(r))
        return out

    async def count(self, tenant: str) -> int:
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, TABLE):
                return 0
            return int(await conn.fetchval("SELECT count(*) FROM dynabase.tenant_events WHERE tenant_key = $1",
                                           tenant))


def _event(row: Mapping[str, Any]) -> StoredEvent:
    return StoredEvent(row["id"], row["tenant_key"], row["org_id"], row["database_name"], row["tier"], row["type"],
                       row["reason"], row["message"], row["at"], json.loads(row["data"]),
                       _delivery(row["delivery"], row["attempts"]))


def _delivery(status: str | None, attempts: int | None) -> str | None:
    if status == "pending" and attempts:
        return f"pending ({attempts} attempt{'s' if attempts > 1 else ''} failed)"
    return status
