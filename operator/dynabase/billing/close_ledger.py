"""The billing close's ledger in Postgres: one row per tenant and month, so each tenant's
overage reaches Stripe exactly once whatever crashes or re-runs.

States: ``nothing`` (no overage: closed without a request), ``pending`` (an amount
to send), ``sent`` (Stripe's item id recorded) and ``unbillable`` (overage of a
tenant no longer declared: no organisation to invoice, listed for a person). A row's amount, description and
idempotency key are fixed when it is first written; a re-run sends the same
request with the same key. ``attempted_at`` is written (and committed) before a
request leaves, so a crash between Stripe's answer and ``sent`` is known to be
"maybe sent" on the next run.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .ledger import create_tables

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.billing_months (
    month text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz
);
CREATE TABLE IF NOT EXISTS dynabase.billing_close (
    month text NOT NULL REFERENCES dynabase.billing_months (month),
    tenant text NOT NULL,
    org_id text,
    state text NOT NULL CHECK (state IN ('nothing', 'pending', 'sent', 'unbillable')),
    idempotency_key text NOT NULL UNIQUE,
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    currency text NOT NULL,
    description text NOT NULL,
    detail jsonb NOT NULL,
    model_version bigint NOT NULL,
    customer_id text,
    attempts integer NOT NULL DEFAULT 0,
    attempted_at timestamptz,
    last_error text,
    stripe_id text,
    sent_at timestamptz,
    PRIMARY KEY (month, tenant)
);
"""
_NEWEST_TABLE = "dynabase.billing_close"
_MONTH_LOCK = 0x6479636C << 32  # "dycl" + the month as YYYYMM: one close of a month at a time


@dataclass(frozen=True)
class Charge:
    """A tenant's month as the close first records it."""

    tenant: str
    org_id: str | None
    amount_cents: int
    currency: str
    description: str
    detail: dict[str, Any]
    model_version: int
    idempotency_key: str


@dataclass(frozen=True)
class Entry:
    month: str
    tenant: str
    org_id: str | None
    state: str
    idempotency_key: str
    amount_cents: int
    currency: str
    description: str
    detail: dict[str, Any]
    model_version: int
    customer_id: str | None
    attempts: int
    attempted_at: dt.datetime | None
    last_error: str | None
    stripe_id: str | None


class CloseBusy(RuntimeError):
    """Another close of the same month holds its lock."""


def month_lock_key(month: str) -> int:
    """``month`` is a valid YYYY-MM."""
    return _MONTH_LOCK | int(month.replace("-", ""))


class PostgresCloseLedger:
    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, dsn: str, *, read_only: bool = False) -> PostgresCloseLedger:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row,
                                                     application_name="dynabase-billing-close")
        if not read_only:
            await create_tables(conn, _NEWEST_TABLE, SCHEMA)
        return cls(conn)

    async def _exists(self) -> bool:
        cur = await self._conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (_NEWEST_TABLE,))
        row = await cur.fetchone()
        return bool(row and row["present"])

    async def lock_month(self, month: str) -> None:
        """Held by this session until ``unlock_month`` or the connection ends (a crash frees it)."""
        cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (month_lock_key(month),))
        row = await cur.fetchone()
        if not row or not row["locked"]:
            raise CloseBusy(f"another billing close of {month} is running; try again when it has finished")

    async def unlock_month(self, month: str) -> None:
        await self._conn.execute("SELECT pg_advisory_unlock(%s)", (month_lock_key(month),))

    async def closed(self, month: str) -> bool:
        if not await self._exists():
            return False
        cur = await self._conn.execute(
            "SELECT closed_at IS NOT NULL AS closed FROM dynabase.billing_months WHERE month = %s", (month,))
        row = await cur.fetchone()
        return bool(row and row["closed"])

    async def entries(self, month: str) -> list[Entry]:
        if not await self._exists():
            return []
        cur = await self._conn.execute(
            "SELECT * FROM dynabase.billing_close WHERE month = %s ORDER BY tenant", (month,))
        return [_entry(row) for row in await cur.fetchall()]

    async def claim(self, month: str, charges: Sequence[Charge]) -> list[Entry]:
        """Record the charges of tenants not yet in the month (existing rows keep what they
        were first written with) and return every row of the month."""
        async with self._conn.transaction():
            await self._conn.execute(
                "INSERT INTO dynabase.billing_months (month) VALUES (%s) ON CONFLICT DO NOTHING", (month,))
            async with self._conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO dynabase.billing_close (month, tenant, org_id, state, idempotency_key, amount_cents, "
                    "currency, description, detail, model_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (month, tenant) DO NOTHING",
                    [(month, c.tenant, c.org_id, _first_state(c), c.idempotency_key,
                      c.amount_cents, c.currency, c.description, json.dumps(c.detail), c.model_version)
                     for c in charges],
                )
        return await self.entries(month)

    async def start_attempt(self, month: str, tenant: str, customer_id: str) -> None:
        """Committed before the request leaves: the customer is fixed from now on."""
        await self._conn.execute(
            "UPDATE dynabase.billing_close SET attempts = attempts + 1, attempted_at = now(), "
            "customer_id = coalesce(customer_id, %s) WHERE month = %s AND tenant = %s AND state = 'pending'",
            (customer_id, month, tenant))

    async def sent(self, month: str, tenant: str, stripe_id: str) -> None:
        await self._conn.execute(
            "UPDATE dynabase.billing_close SET state = 'sent', stripe_id = %s, sent_at = now(), last_error = NULL "
            "WHERE month = %s AND tenant = %s", (stripe_id, month, tenant))

    async def failed(self, month: str, tenant: str, error: str) -> None:
        await self._conn.execute(
            "UPDATE dynabase.billing_close SET last_error = %s WHERE month = %s AND tenant = %s",
            (error[:500], month, tenant))

    async def finish(self, month: str) -> bool:
        """The month is closed once no row is pending."""
        cur = await self._conn.execute(
            "UPDATE dynabase.billing_months SET closed_at = now() WHERE month = %s AND closed_at IS NULL AND NOT "
            "EXISTS (SELECT 1 FROM dynabase.billing_close WHERE month = %s AND state = 'pending') RETURNING month",
            (month, month))
        return await cur.fetchone() is not None or await self.closed(month)

    async def close(self) -> None:
        await self._conn.close()


def _first_state(charge: Charge) -> str:
    if charge.amount_cents <= 0:
        return "nothing"
    return "pending" if charge.org_id else "unbillable"


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(
        month=row["month"], tenant=row["tenant"], org_id=row["org_id"], state=row["state"],
        idempotency_key=row["idempotency_key"], amount_cents=int(row["amount_cents"]), currency=row["currency"],
        description=row["description"], detail=dict(row["detail"]), model_version=int(row["model_version"]),
        customer_id=row["customer_id"], attempts=int(row["attempts"]), attempted_at=row["attempted_at"],
        last_error=row["last_error"], stripe_id=row["stripe_id"],
    )
