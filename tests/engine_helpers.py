"""Helpers to build tenants, policies and an engine on the devstack's Postgres."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import yaml

from dynabase.backends.postgres import PostgresBackend
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.spec import TenantDatabase, TierPolicy

from .conftest import ROOT


def example_policy() -> TierPolicy:
    raw = yaml.safe_load((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    return TierPolicy.model_validate(raw)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def make_tenant(db: str, tier: str, **spec: Any) -> TenantDatabase:
    return TenantDatabase.model_validate(
        {
            "apiVersion": "dynabase.io/v1alpha1",
            "kind": "TenantDatabase",
            "metadata": {"name": db.replace("_", "-"), "namespace": "test", "generation": 1},
            "spec": {"orgId": f"org-{db}", "tier": tier, "databaseName": db, **spec},
        }
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += dt.timedelta(**kwargs)


async def make_engine(dsn: str, clock: FakeClock | None = None) -> tuple[Engine, MemorySecretStore, MemoryStatusStore]:
    backend = PostgresBackend(dsn, pool_size=4)
    await backend.start()
    secrets, statuses = MemorySecretStore(), MemoryStatusStore()
    engine = Engine(postgres=backend, secrets=secrets, status_store=statuses, clock=clock or FakeClock())
    return engine, secrets, statuses
