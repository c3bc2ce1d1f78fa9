"""What was already done: processed Stripe event ids, the last applied event per org,
and the Stripe customer of each org.

Stripe delivers at least once and in no particular order. The ledger makes a
retried event a no-op, and lets an older event lose against a newer one already
applied for the same org (Stripe's `created`, seconds). The customer of the
newest subscription event per org is what the month-end close invoices.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import tuple_row

from dynabase.settings import PLATFORM_SCHEMA_LOCK

# Ignored and refused events are remembered this long: Stripe retries for three days.
FORGET_AFTER_SECONDS = 30 * 24 * 3600

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.stripe_events (
    event_id text PRIMARY KEY,
    outcome text NOT NULL,
    applied boolean NOT NULL DEFAULT false,
    org_id text,
    event_created bigint,
    subscription_id text,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stripe_events_applied_by_org
    ON dynabase.stripe_events (org_id, event_created DESC) WHERE applied;
CREATE TABLE IF NOT EXISTS dynabase.stripe_customers (
    org_id text PRIMARY KEY,
    customer_id text NOT NULL,
    event_created bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


async def create_tables(conn: psycopg.AsyncConnection[Any], newest_table: str, ddl: str) -> None:
    """Run ``ddl`` unless ``newest_table`` exists, under the platform schema lock that every
    creator of objects in schema dynabase takes (``dynabase.backends.platform_schema``)."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (newest_table,))
        row = await cur.fetchone()
    if row is not None and row[0]:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PLATFORM_SCHEMA_LOCK,))
        await conn.execute(ddl)


@dataclass(frozen=True)
class AppliedMark:
    """The newest event whose tier was applied for an org."""

    created: int
    subscription_id: str


class EventLedger(Protocol):
    async def seen(self, event_id: str) -> bool: ...

    async def last_applied(self, org_id: str) -> AppliedMark | None: ...

    async def record(self, event_id: str, outcome: str, org_id: str | None = None,
                     applied: AppliedMark | None = None) -> None: ...

    async def record_customer(self, org_id: str, customer_id: str, created: int) -> None: ...

    async def close(self) -> None: ...


class PostgresLedger:
    """`dynabase.stripe_events`: shared by every replica pointing at the same database."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()  # one connection: one statement at a time

    @classmethod
    async def open(cls, dsn: str, *, prune: bool = True) -> PostgresLedger:
        """``prune``: forget old ignored events (the webhook server does; the billing close only reads)."""
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="dynabase-webhooks")
        await create_tables(conn, "dynabase.stripe_customers", SCHEMA)
        if prune:
            await conn.execute(
                "DELETE FROM dynabase.stripe_events WHERE NOT applied AND processed_at < now() "
                "- make_interval(secs => %s)", (FORGET_AFTER_SECONDS,),
            )
        return cls(conn)

    async def seen(self, event_id: str) -> bool:
        async with self._lock:
            cur = await self._conn.execute("SELECT 1 FROM dynabase.stripe_events WHERE event_id = %s", (event_id,))
            return await cur.fetchone() is not None

    async def last_applied(self, org_id: str) -> AppliedMark | None:
        async with self._lock:
            cur = await self._conn.execute(
                "SELECT event_created, subscription_id FROM dynabase.stripe_events WHERE applied AND org_id = %s "
                "ORDER BY event_created DESC, processed_at DESC LIMIT 1",
                (org_id,),
            )
            row = await cur.fetchone()
        return AppliedMark(int(row[0]), str(row[1] or "")) if row else None

    async def record(self, event_id: str, outcome: str, org_id: str | None = None,
                     applied: AppliedMark | None = None) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO dynabase.stripe_events (event_id, outcome, applied, org_id, event_created, "
                "subscription_id) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
                (event_id, outcome, applied is not None, org_id,
                 applied.created if applied else None, applied.subscription_id if applied else None),
            )

    async def record_customer(self, org_id: str, customer_id: str, created: int) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO dynabase.stripe_customers (org_id, customer_id, event_created) VALUES (%s, %s, %s) "
                "ON CONFLICT (org_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, "
                "event_created = EXCLUDED.event_created, updated_at = now() "
                "WHERE dynabase.stripe_customers.event_created <= EXCLUDED.event_created",
                (org_id, customer_id, created),
            )

    async def customers(self, org_ids: list[str]) -> dict[str, str]:
        """org id -> Stripe customer id, for the orgs that have one."""
        async with self._lock:
            cur = await self._conn.execute(
                "SELECT org_id, customer_id FROM dynabase.stripe_customers WHERE org_id = ANY(%s)", (org_ids,))
            return {str(org): str(customer) for org, customer in await cur.fetchall()}

    async def close(self) -> None:
        await self._conn.close()


class FileLedger:
    """A JSON file, for a single replica without Postgres. Rewritten atomically on every record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events: dict[str, dict[str, Any]] = {}
        self._orgs: dict[str, AppliedMark] = {}
        self._customers: dict[str, dict[str, Any]] = {}  # org -> {"customerId", "created"}
        self._lock = asyncio.Lock()
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            self._events = dict(data.get("events", {}))
            self._orgs = {org: AppliedMark(int(m["created"]), str(m["subscriptionId"]))
                          for org, m in data.get("orgs", {}).items()}
            self._customers = dict(data.get("customers", {}))

    async def seen(self, event_id: str) -> bool:
        return event_id in self._events

    async def last_applied(self, org_id: str) -> AppliedMark | None:
        return self._orgs.get(org_id)

    async def record(self, event_id: str, outcome: str, org_id: str | None = None,
                     applied: AppliedMark | None = None) -> None:
        async with self._lock:
            if event_id in self._events:
                return
            now = time.time()
            self._events[event_id] = {"outcome": outcome, "orgId": org_id, "at": now, "applied": applied is not None}
            if applied is not None and org_id is not None:
                current = self._orgs.get(org_id)
                if current is None or applied.created >= current.created:
                    self._orgs[org_id] = applied
            # Applied events only matter through `orgs` once Stripe has stopped retrying them.
            self._events = {k: v for k, v in self._events.items() if now - float(v["at"]) < FORGET_AFTER_SECONDS}
            await asyncio.to_thread(self._write)

    async def record_customer(self, org_id: str, customer_id: str, created: int) -> None:
        async with self._lock:
            current = self._customers.get(org_id)
            if current is not None and (int(current["created"]) > created or current["customerId"] == customer_id):
                return
            self._customers[org_id] = {"customerId": customer_id, "created": created}
            await asyncio.to_thread(self._write)

    def _write(self) -> None:
        data = {
            "events": self._events,
            "orgs": {org: {"created": m.created, "subscriptionId": m.subscription_id} for org, m in self._orgs.items()},
            "customers": self._customers,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    async def close(self) -> None:
        return None
