"""Tenant status kept in Postgres (headless mode and `dynabase apply`)."""

from __future__ import annotations

import json

import asyncpg

from dynabase.spec import TenantDatabaseStatus

from .platform_schema import create_once, table_exists

_TABLE = "dynabase.tenant_status"
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.tenant_status (
    tenant_key text PRIMARY KEY,
    status jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


class PostgresStatusStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            await create_once(self._pool, _TABLE, _SCHEMA)
            self._ready = True

    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        # Reading never creates the table, so `dynabase plan` stays read-only.
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, _TABLE):
                return {}
            rows = await conn.fetch(
                "SELECT tenant_key, status::text FROM dynabase.tenant_status WHERE tenant_key = ANY($1::text[])",
                keys,
            )
        return {r["tenant_key"]: TenantDatabaseStatus.model_validate_json(r["status"]) for r in rows}

    async def save(self, key: str, status: TenantDatabaseStatus) -> None:
        await self._ensure()
        payload = json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True))
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO dynabase.tenant_status (tenant_key, status) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (tenant_key) DO UPDATE SET status = EXCLUDED.status, updated_at = now()",
                key,
                payload,
            )

    async def delete(self, key: str) -> None:
        await self._ensure()
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM dynabase.tenant_status WHERE tenant_key = $1", key)
