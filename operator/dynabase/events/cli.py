"""`dynabase events`: the tenants' event history from Postgres (either mode), or the notifications'
ledger with ``--deliveries``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any

import asyncpg

from dynabase.backends.events_pg import PostgresEventLog, StoredEvent
from dynabase.backends.notify_pg import Delivery, NotificationLedger
from dynabase.options import EXIT_INVALID, EXIT_OK, Command
from dynabase.settings import parse_duration

TENANT_HELP = "only this tenant (namespace/name)"


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``24h``, ``7d`` ago, or a date/time (``2026-11-01``, ``2026-11-01T12:00``, UTC unless given)."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        return now - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: expected a duration ago (30m, 24h, 7d) or a date/time (2026-11-01T12:00)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _tenant(text: str) -> str:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"--tenant {text!r}: expected namespace/name, e.g. default/acme")
    return text


def add_events_command(sub: Any) -> None:
    cmd = Command(sub.add_parser("events", help="tenant events kept in Postgres (usage 80 %/100 %, Cold, tier "
                                                "changes, restrictions …), newest first"))
    cmd.parser.add_argument("--tenant", type=_tenant, help=TENANT_HELP)
    cmd.parser.add_argument("--since", type=parse_since, help="30m, 24h, 7d ago, or a date/time (UTC)")
    cmd.parser.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    cmd.parser.add_argument("--deliveries", action="store_true",
                            help="the notifications' ledger instead: status, attempts, next retry, last error")
    cmd.parser.add_argument("--format", choices=["table", "json"], default="table")
    cmd.option("--postgres-dsn", env="DYNABASE_POSTGRES_DSN", required=True, help="the platform's Postgres")
    cmd.done(run_events)


def run_events(args: argparse.Namespace) -> int:
    async def read() -> list[StoredEvent] | list[Delivery]:
        pool = await asyncpg.create_pool(args.postgres_dsn, min_size=1, max_size=1)
        try:
            if args.deliveries:
                return await NotificationLedger(pool).deliveries(tenant=args.tenant, limit=args.limit)
            return await PostgresEventLog(pool).recent(tenant=args.tenant, since=args.since, limit=args.limit)
        finally:
            await pool.close()

    try:
        rows = asyncio.run(read())
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"events: cannot read Postgres: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.format == "json":
        print(json.dumps([_json(row) for row in rows], indent=2, default=str))
    elif not rows:
        print("no deliveries" if args.deliveries else "no events")
    else:
        print("\n".join(_table(rows)))
    return EXIT_OK


def _json(row: StoredEvent | Delivery) -> dict[str, Any]:
    if isinstance(row, StoredEvent):
        return row.as_json()
    return {"eventId": row.event_id, "tenant": row.tenant, "reason": row.reason, "status": row.status,
            "attempts": row.attempts, "nextAttemptAt": row.next_attempt_at, "lastStatus": row.last_status,
            "lastError": row.last_error, "endpoint": row.endpoint, "createdAt": row.created_at,
            "deliveredAt": row.delivered_at}


def _table(rows: list[StoredEvent] | list[Delivery]) -> list[str]:
    header: tuple[str, ...]
    lines: list[tuple[str, ...]]
    if isinstance(rows[0], StoredEvent):
        header = ("AT (UTC)", "TENANT", "TYPE", "REASON", "NOTIFIED", "MESSAGE")
        lines = [(f"{e.at:%Y-%m-%d %H:%M:%S}", e.tenant, e.type, e.reason, e.delivery or "-", e.message)
                 for e in rows if isinstance(e, StoredEvent)]
    else:
        header = ("CREATED (UTC)", "TENANT", "REASON", "STATUS", "ATTEMPTS", "NEXT TRY", "LAST")
        lines = [(f"{d.created_at:%Y-%m-%d %H:%M:%S}", d.tenant, d.reason, d.status, str(d.attempts),
                  f"{d.next_attempt_at:%H:%M:%S}" if d.next_attempt_at else "-",
                  d.last_error or (f"HTTP {d.last_status}" if d.last_status else "-"))
                 for d in rows if isinstance(d, Delivery)]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
            for row in [header, *lines]]
