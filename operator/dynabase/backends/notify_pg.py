"""The notifications' outbox and ledger in Postgres (``dynabase.notification_deliveries``).

One row per notified event, written in the event's own transaction (``events_pg``)
with the exact body that will be POSTed, so every retry sends the same bytes. The
delivery loops claim due rows with ``FOR UPDATE SKIP LOCKED`` and a lease, so
several replicas never send one row at the same time, and a replica that dies
mid-attempt leaves the row to the next claim once its lease has run out. A row is
``pending`` until a 2xx answer makes it ``delivered`` (never sent again),
``failed`` after the last attempt, or ``cancelled`` when its tenant no longer
declares notifications.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .platform_schema import create_once, table_exists

TABLE = "dynabase.notification_deliveries"
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.notification_deliveries (
    event_id text PRIMARY KEY,
    tenant_key text NOT NULL,
    reason text NOT NULL,
    body text NOT NULL,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_until timestamptz,
    last_attempt_at timestamptz,
    last_status integer,
    last_error text,
    endpoint text,
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX IF NOT EXISTS notification_deliveries_due
    ON dynabase.notification_deliveries (next_attempt_at) WHERE status = 'pending';
"""


@dataclass(frozen=True)
class OutboxEntry:
    event_id: str
    tenant: str
    reason: str
    body: str  # the JSON POSTed, byte for byte on every attempt


@dataclass(frozen=True)
class Claimed:
    event_id: str
    tenant: str
    reason: str
    body: str
    attempts: int  # finished before this one


@dataclass(frozen=True)
class Delivery:
    event_id: str
    tenant: str
    reason: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status: int | None
    last_error: str | None
    endpoint: str | None  # scheme://host of the last attempt
    created_at: dt.datetime
    delivered_at: dt.datetime | None


async def ensure(pool: asyncpg.Pool) -> None:
    await create_once(pool, TABLE, SCHEMA)


async def enqueue(conn: asyncpg.Connection, entries: Sequence[OutboxEntry]) -> None:
    """Inside the caller's transaction; an event id already queued is left as it is."""
    if not entries:
        return
    await conn.execute(
        "INSERT INTO dynabase.notification_deliveries (event_id, tenant_key, reason, body) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) ON CONFLICT (event_id) DO NOTHING",
        [e.event_id for e in entries], [e.tenant for e in entries], [e.reason for e in entries],
        [e.body for e in entries],
    )


class NotificationLedger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            await ensure(self._pool)
            self._ready = True

    async def claim_due(self, limit: int, lease_seconds: float,
                        due_by: dt.datetime | None = None) -> tuple[list[Claimed], dt.datetime]:
        """Pending rows due by ``due_by`` (default now) that no other sender holds, leased to this one for
        ``lease_seconds``; and the database's time now."""
        await self._ensure()
        async with self._pool.acquire() as conn, conn.transaction():
            now = await conn.fetchval("SELECT now()")
            rows = await conn.fetch(
                "UPDATE dynabase.notification_deliveries d "
                "SET claimed_until = now() + make_interval(secs => $2) "
                "WHERE d.event_id IN (SELECT event_id FROM dynabase.notification_deliveries "
                " WHERE status = 'pending' AND next_attempt_at <= coalesce($3, now()) "
                " AND (claimed_until IS NULL OR claimed_until < now()) "
                " ORDER BY next_attempt_at, event_id LIMIT $1 FOR UPDATE SKIP LOCKED) "
                "RETURNING d.event_id, d.tenant_key, d.reason, d.body, d.attempts",
                limit, lease_seconds, due_by,
            )
        return [Claimed(r["event_id"], r["tenant_key"], r["reason"], r["body"], r["attempts"]) for r in rows], now

    async def delivered(self, event_id: str, status: int, endpoint: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE dynabase.notification_deliveries SET status = 'delivered', attempts = attempts + 1, "
                "last_attempt_at = now(), delivered_at = now(), last_status = $2, last_error = NULL, endpoint = $3, "
                "claimed_until = NULL WHERE event_id = $1 AND status = 'pending'",
                event_id, status, endpoint,
            )

    async def attempt_failed(self, event_id: str, *, status: int | None, error: str, endpoint: str | None,
                             retry_in: float | None) -> None:
        """One more failed attempt: retried in ``retry_in`` seconds, or failed for good when None."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE dynabase.notification_deliveries SET attempts = attempts + 1, last_attempt_at = now(), "
                "last_status = $2, last_error = $3, endpoint = coalesce($4, endpoint), claimed_until = NULL, "
                "status = CASE WHEN $5::float8 IS NULL THEN 'failed' ELSE 'pending' END, "
                "next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at "
                "ELSE now() + make_interval(secs => $5::float8) END "
                "WHERE event_id = $1 AND status = 'pending'",
                event_id, status, error[:500], endpoint, retry_in,
            )

    async def cancel(self, event_id: str, why: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE dynabase.notification_deliveries SET status = 'cancelled', last_error = $2, "
                "claimed_until = NULL WHERE event_id = $1 AND status = 'pending'",
                event_id, why[:500],
            )

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest pending row is due (0 when one is), None when none is pending."""
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, TABLE):
                return None
            value = await conn.fetchval(
                "SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(claimed_until, next_attempt_at))) "
                "- now()) FROM dynabase.notification_deliveries WHERE status = 'pending'")
        return None if value is None else max(0.0, float(value))

    async def deliveries(self, *, tenant: str | None = None, limit: int = 100) -> list[Delivery]:
        """Newest first. Reading never creates the table."""
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, TABLE):
                return []
            rows = await conn.fetch(
                "SELECT event_id, tenant_key, reason, status, attempts, next_attempt_at, last_status, last_error, "
                "endpoint, created_at, delivered_at FROM dynabase.notification_deliveries "
                "WHERE $1::text IS NULL OR tenant_key = $1 ORDER BY created_at DESC, event_id LIMIT $2",
                tenant, limit,
            )
        return [Delivery(r["event_id"], r["tenant_key"], r["reason"], r["status"], r["attempts"],
                         r["next_attempt_at"] if r["status"] == "pending" else None, r["last_status"],
                         r["last_error"], r["endpoint"], r["created_at"], r["delivered_at"]) for r in rows]
