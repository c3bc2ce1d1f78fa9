"""The platform's own tables (schema ``dynabase``): created when first written, one creator at a time.

``CREATE SCHEMA/TABLE IF NOT EXISTS`` is not safe against itself: two sessions
creating the same object at once can both pass the check and one then fails
with a unique violation on the catalog (several replicas, or many tenants'
first passes at once). Creation therefore runs under a transaction-scoped
advisory lock; whoever waits finds the object made and its IF NOT EXISTS does
nothing.
"""

from __future__ import annotations

import asyncpg

from dynabase.settings import PLATFORM_SCHEMA_LOCK as SCHEMA_LOCK

__all__ = ["SCHEMA_LOCK", "create_once", "table_exists"]


async def table_exists(conn: asyncpg.Connection, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def create_once(pool: asyncpg.Pool, table: str, ddl: str) -> None:
    """Run ``ddl`` (idempotent statements) unless ``table`` exists, serialised with every other creator."""
    async with pool.acquire() as conn:
        if await table_exists(conn, table):
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(ddl)
