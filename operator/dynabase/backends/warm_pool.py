"""The warm pool in Postgres: list, create, drop and claim pool databases.

Two engines (operator shards, replicas, a `dynabase apply` beside them) may
claim and fill at once:

- A claim takes a transaction-scoped advisory lock on the pool database's oid
  (``pg_try_advisory_xact_lock``, skipping the ones others hold) and checks, in
  a fresh snapshot, that it still has its pool name; the rename commits with the
  tenant's role and grants and the lock is released only then. So no pool
  database is handed to two tenants, and a claimer never waits for another.
- Dropping an extra pool database takes the same lock (session-scoped), so it
  never drops one being claimed.
- Filling runs under one session advisory lock: one filler at a time, so several
  engines do not each top the pool up to its size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from dynabase.desired.warm_pool import (
    POOL_OWNER,
    POOL_PREFIX,
    create_pool_database,
    drop_pool_database,
    like_pattern,
    rename_sql,
)
from dynabase.settings import WARM_POOL_CLAIM_LOCK, WARM_POOL_FILL_LOCK

log = logging.getLogger(__name__)

_POOL_DATABASES = """
SELECT d.oid, d.datname FROM pg_catalog.pg_database d
WHERE d.datname LIKE $1 AND d.datdba = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2)
ORDER BY d.oid
"""
_CLAIMABLE = """
SELECT d.datname FROM pg_catalog.pg_database d
WHERE d.oid = $1 AND d.datname = $2 AND NOT d.datallowconn
  AND d.datdba = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $3)
"""


async def pool_databases(conn: asyncpg.Connection, prefix: str = POOL_PREFIX) -> list[tuple[int, str]]:
    """Unclaimed pool databases whose names start with ``prefix``: (oid, name), oldest first."""
    return [(row["oid"], row["datname"]) for row in await conn.fetch(_POOL_DATABASES, like_pattern(prefix),
                                                                       POOL_OWNER)]


async def claim(conn: asyncpg.Connection, prefix: str, database: str) -> str | None:
    """Inside the caller's transaction: rename one pool database to ``database``; None if none is left."""
    for oid, name in await pool_databases(conn, prefix):
        # Rows someone else is claiming are skipped; a lock taken here is held until commit.
        if not await conn.fetchval("SELECT pg_catalog.pg_try_advisory_xact_lock($1, $2)",
                                   WARM_POOL_CLAIM_LOCK, _lock_id(oid)):
            continue
        # The list was read before the lock: a claim that committed meanwhile renamed it.
        if await conn.fetchval(_CLAIMABLE, oid, name, POOL_OWNER) is None:
            continue
        await conn.execute(rename_sql(name, database))
        return name
    return None


def _lock_id(oid: int) -> int:
    return oid - 2**32 if oid >= 2**31 else oid  # oids are unsigned; the lock key is a signed int4


class WarmPoolStore:
    """The filler's side: its own connections, so filling never takes one a pass needs."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": "dynabase-warm-pool"})
        try:
            yield conn
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def fill_lock(self) -> AsyncIterator[asyncpg.Connection | None]:
        """A connection holding the fill lock, or None when another engine is filling."""
        async with self.connection() as conn:
            if not await conn.fetchval("SELECT pg_catalog.pg_try_advisory_lock($1)", WARM_POOL_FILL_LOCK):
                yield None
                return
            try:
                yield conn
            finally:
                await conn.execute("SELECT pg_catalog.pg_advisory_unlock($1)", WARM_POOL_FILL_LOCK)

    async def create(self, conn: asyncpg.Connection, name: str) -> None:
        for sql in create_pool_database(name):
            await conn.execute(sql)



async def drop_unclaimed(conn: asyncpg.Connection, oid: int, name: str) -> bool:
    """Drop an unclaimed pool database unless a claim holds it right now."""
    if not await conn.fetchval("SELECT pg_catalog.pg_try_advisory_lock($1, $2)", WARM_POOL_CLAIM_LOCK, _lock_id(oid)):
        return False
    try:
        if await conn.fetchval(_CLAIMABLE, oid, name, POOL_OWNER) is None:
            return False
        await conn.execute(drop_pool_database(name))
        return True
    finally:
        await conn.execute("SELECT pg_catalog.pg_advisory_unlock($1, $2)", WARM_POOL_CLAIM_LOCK, _lock_id(oid))
