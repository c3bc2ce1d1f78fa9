"""The cost model's versions in Postgres (``dynabase.cost_models``): one row per refit or
calibration, read by the engine's usage judgment, the usage report and the billing close.

A version applies from ``effective_from`` (when it was written). The engine uses
the newest; a month's report and close use the one in force at the month's end,
so a calibration written after a month never reprices it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping

import asyncpg

from dynabase.desired.cost import CostModel, FittedModel, model_document, model_from_document

from .platform_schema import create_once, table_exists

_TABLE = "dynabase.cost_models"
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.cost_models (
    version bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    effective_from timestamptz NOT NULL DEFAULT now(),
    document jsonb NOT NULL,
    source text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS cost_models_in_force ON dynabase.cost_models (effective_from DESC, version DESC);
"""


class PostgresCostModels:
    def __init__(self, pool: asyncpg.Pool, *, refresh_seconds: float = 60.0) -> None:
        self._pool = pool
        self.refresh_seconds = refresh_seconds  # how stale the engine's copy may get
        self._cached: FittedModel | None = None
        self._read_at = -1e18

    async def in_force(self, at: dt.datetime | None = None) -> FittedModel:
        """The version in force at ``at`` (default now); the built-in defaults when none is stored."""
        async with self._pool.acquire() as conn:
            if not await table_exists(conn, _TABLE):  # reading never creates it (`dynabase plan`)
                return FittedModel()
            row = await conn.fetchrow(
                "SELECT version, document::text, source FROM dynabase.cost_models "
                "WHERE effective_from <= coalesce($1, now()) ORDER BY effective_from DESC, version DESC LIMIT 1",
                at,
            )
        if row is None:
            return FittedModel()
        model, factors = model_from_document(json.loads(row["document"]), f"{_TABLE} version {row['version']}")
        return FittedModel(model, factors, int(row["version"]), str(row["source"]))

    async def current(self) -> FittedModel:
        """The newest version, re-read at most every ``refresh_seconds`` (one query per pass otherwise)."""
        if self._cached is None or time.monotonic() - self._read_at >= self.refresh_seconds:
            self._cached = await self.in_force()
            self._read_at = time.monotonic()
        return self._cached

    async def write(self, model: CostModel, tenant_factors: Mapping[str, float], source: str,
                    effective_from: dt.datetime | None = None) -> FittedModel:
        """A new version (never an update: a closed month keeps pointing at the one it used)."""
        await create_once(self._pool, _TABLE, _SCHEMA)
        document = json.dumps(model_document(model, tenant_factors), sort_keys=True)
        async with self._pool.acquire() as conn:
            version = await conn.fetchval(
                "INSERT INTO dynabase.cost_models (effective_from, document, source) "
                "VALUES (coalesce($1, now()), $2::jsonb, $3) RETURNING version",
                effective_from, document, source,
            )
        self._cached = None
        return FittedModel(model, dict(tenant_factors), int(version), source)
