"""Shared bench plumbing: a devstack in a temp dir and generated tenants."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.devstack.stack import Devstack
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.spec import TenantDatabase, TierPolicy

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("FREE", "STARTER", "PRO", "ENTERPRISE")


@contextlib.contextmanager
def devstack(services: list[str], parent: str | None = None) -> Iterator[dict[str, str]]:
    """``parent``: where the stack's folder goes (e.g. a larger or compressed filesystem for Postgres)."""
    root = Path(tempfile.mkdtemp(prefix="dynabase-bench-", dir=parent))
    stack = Devstack(root)
    try:
        stack.up(services, build=False)
        yield stack.env()
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


def policy() -> TierPolicy:
    return TierPolicy.model_validate(yaml.safe_load((ROOT / "examples" / "tierpolicy-default.yaml").read_text()))


def tenants(count: int, *, prefix: str = "b") -> list[TenantDatabase]:
    return [
        TenantDatabase.model_validate({
            "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
            "metadata": {"name": f"{prefix}-{i:05d}", "namespace": "bench"},
            "spec": {"orgId": f"org-{i}", "tier": TIERS[i % len(TIERS)]},
        })
        for i in range(count)
    ]


async def proxy_engine(env: dict[str, str]) -> tuple[Engine, MemorySecretStore]:
    """An engine over the stack's Postgres, PgBouncer agent and proxy limits; close with engine.runtime.close_engine."""
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"])
    await postgres.start()
    secrets = MemorySecretStore()
    engine = Engine(postgres=postgres, pgbouncer=PgBouncerBackend(env["DYNABASE_REDIS_URL"]),
                    proxy=ProxyBackend(env["DYNABASE_REDIS_URL"]), secrets=secrets, status_store=MemoryStatusStore())
    return engine, secrets
