"""Tenant passwords that survive: sealed in Postgres, shared by replicas, never regenerated for a role that
has one (SecretMissing instead), and never shown in logs, status or plans."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from dynabase.backends.platform_schema import create_once
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.secrets_pg import PostgresSecretStore, SecretsKeyring, SecretUnreadable
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.devstack.stack import free_port
from dynabase.engine.reconciler import Engine, PassResult, TenantResult
from dynabase.engine.stores import (
    DirectorySecretStore,
    EnvironmentPasswords,
    MemorySecretStore,
    SecretStore,
    password_variable,
)
from dynabase.spec import TenantDatabase

from .conftest import ROOT, Stack
from .engine_helpers import example_policy, make_tenant, unique

KEY = "q5Yk3m2dJYl0hm6pR3d1b0xg0kYp0k2m8wqN1wz2m4M="
OTHER_KEY = "A" * 43 + "="


# -- a fresh platform database per test: the dynabase schema starts absent ----------------------------------

@pytest.fixture
async def platform_dsn(stack: Stack) -> AsyncIterator[str]:
    admin_dsn = stack.env["DYNABASE_POSTGRES_DSN"]
    name = unique("platform")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class Replica:
    """One engine with its own pool and stores, as one headless replica has."""

    def __init__(self, dsn: str, secrets: SecretStore | None = None, key: str = KEY) -> None:
        self.dsn, self.key = dsn, key
        self.backend = PostgresBackend(dsn, pool_size=8)
        self._secrets = secrets

    async def __aenter__(self) -> Replica:
        await self.backend.start()
        self.store = PostgresSecretStore(self.backend.pool, SecretsKeyring.parse(self.key))
        self.secrets = self._secrets or EnvironmentPasswords(self.store)
        self.statuses = PostgresStatusStore(self.backend.pool)
        self.engine = Engine(postgres=self.backend, secrets=self.secrets, status_store=self.statuses)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.backend.close()

    async def reconcile(self, tenants: list[TenantDatabase], *, dry_run: bool = False) -> PassResult:
        return await self.engine.reconcile_all({"default": example_policy()}, tenants, dry_run=dry_run, complete=True)


async def verifiers(dsn: str, roles: list[str]) -> dict[str, str | None]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY($1::text[])", roles)
    finally:
        await conn.close()
    return {r["rolname"]: r["rolpassword"] for r in rows}


async def can_log_in(stack: Stack, role: str, password: str) -> bool:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=int(stack.env["PGPORT"]), user=role,
                                     password=password, database=role)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


def condition(result: TenantResult, type_: str) -> tuple[str, str] | None:
    found = [(o.reason, o.message) for o in result.outcomes if o.condition_type == type_]
    return found[0] if found else None


# -- the sealed store --------------------------------------------------------------------------------------

def test_a_sealed_password_opens_only_for_its_tenant_and_its_key() -> None:
    ring = SecretsKeyring.parse(KEY)
    sealed_by, sealed = ring.seal("ns/a", "pw-of-a")
    assert ring.open("ns/a", sealed_by, sealed) == "pw-of-a" and b"pw-of-a" not in sealed
    assert ring.seal("ns/a", "pw-of-a")[1] != sealed  # a fresh nonce every time
    with pytest.raises(SecretUnreadable, match="copied from another tenant") as copied:
        ring.open("ns/b", sealed_by, sealed)
    with pytest.raises(SecretUnreadable, match=f"sealed with key {sealed_by}, which DYNABASE_SECRETS_KEY does not "
                                               "hold") as other:
        SecretsKeyring.parse(OTHER_KEY).open("ns/a", sealed_by, sealed)
    for message in (str(copied.value), str(other.value)):
        assert "pw-of-a" not in message and KEY not in message
    assert KEY not in repr(ring)


async def test_schema_creation_is_serialised_on_a_fresh_database(platform_dsn: str) -> None:
    """Many first writers at once (status and secrets of many tenants) on a database without the schema."""
    pools = [await asyncpg.create_pool(platform_dsn, min_size=4, max_size=4) for _ in range(3)]
    try:
        ring = SecretsKeyring.parse(KEY)
        statuses = [PostgresStatusStore(pool) for pool in pools]
        secrets = [PostgresSecretStore(pool, ring) for pool in pools]
        tenants = [make_tenant(unique("fresh"), "FREE") for _ in range(8)]
        from dynabase.spec import TenantDatabaseStatus

        created = asyncio.gather(*(store.create_password(t, f"pw-{i}") for t in tenants
                                   for i, store in enumerate(secrets)))
        await asyncio.gather(
            *(store.save(t.key, TenantDatabaseStatus(phase="Active")) for store in statuses for t in tenants),
            created,
            *(create_once(pool, "dynabase.tenant_status", "CREATE SCHEMA IF NOT EXISTS dynabase") for pool in pools),
        )
        returned = created.result()
        for n, tenant in enumerate(tenants):  # every writer got the one stored password back
            answers = set(returned[n * len(secrets):(n + 1) * len(secrets)])
            assert answers == {await PostgresSecretStore(pools[0], ring).get_password(tenant)}
        assert len(await statuses[0].load([t.key for t in tenants])) == len(tenants)
    finally:
        for pool in pools:
            await pool.close()


async def test_two_replicas_first_passes_at_once_agree_on_every_password(stack: Stack, platform_dsn: str) -> None:
    tenants = [make_tenant(unique("pair"), "FREE") for _ in range(6)]
    async with Replica(platform_dsn) as one, Replica(platform_dsn) as two:
        await asyncio.gather(one.reconcile(tenants), two.reconcile(tenants))
        second = await one.reconcile(tenants)  # a CREATE ROLE lost to the other replica is retried here
        assert all(t.ready for t in second.tenants), [t.outcomes for t in second.tenants if not t.ready]
        for tenant in tenants:
            mine, theirs = await one.secrets.get_password(tenant), await two.secrets.get_password(tenant)
            assert mine is not None and mine == theirs
            assert await can_log_in(stack, tenant.database_name, mine)
        quiet = await two.reconcile(tenants)
        assert quiet.writes == 0 and not quiet.changes


async def test_an_older_key_opens_its_rows_and_they_are_sealed_again_with_the_new(platform_dsn: str) -> None:
    tenant = make_tenant(unique("rot"), "FREE")
    pool = await asyncpg.create_pool(platform_dsn, min_size=1, max_size=2)
    try:
        old = PostgresSecretStore(pool, SecretsKeyring.parse(OTHER_KEY))
        password = await old.create_password(tenant, "rotated-pw")
        rotating = PostgresSecretStore(pool, SecretsKeyring.parse(f"{KEY},{OTHER_KEY}"))
        assert await rotating.get_password(tenant) == password
        only_new = PostgresSecretStore(pool, SecretsKeyring.parse(KEY))
        assert await only_new.get_password(tenant) == password  # the row now says the new key
        with pytest.raises(SecretUnreadable, match="does not hold"):
            await PostgresSecretStore(pool, SecretsKeyring.parse(OTHER_KEY)).get_password(tenant)
    finally:
        await pool.close()


# -- never regenerated for a role that has a password -------------------------------------------------------

async def test_a_lost_secret_is_secret_missing_and_no_password_is_altered(stack: Stack, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = stack.env["DYNABASE_POSTGRES_DSN"]
    tenant = make_tenant(unique("lost"), "FREE")
    role = tenant.database_name
    files = DirectorySecretStore(tmp_path / "first-disk")
    async with Replica(dsn, EnvironmentPasswords(files)) as first:
        assert (await first.reconcile([tenant])).tenants[0].ready
    password = (tmp_path / "first-disk" / f"{tenant.namespace}__{tenant.name}").read_text().strip()
    before = await verifiers(dsn, [role])

    # Redeployed with an empty disk: the role keeps its password, the tenant says what is missing.
    empty = EnvironmentPasswords(DirectorySecretStore(tmp_path / "new-disk"))
    async with Replica(dsn, empty) as redeployed:
        plan = (await redeployed.reconcile([tenant], dry_run=True)).tenants[0]
        assert not any("PASSWORD" in line or "generated" in line for line in plan.plans["postgres"])
        result = (await redeployed.reconcile([tenant])).tenants[0]
        reason, message = condition(result, "SecretReady") or ("", "")
        assert not result.ready and reason == "SecretMissing"
        assert password_variable(tenant) in message and "new-disk" in message and "PASSWORD NULL" in message
        assert await verifiers(dsn, [role]) == before and not (tmp_path / "new-disk").exists()
        assert await can_log_in(stack, role, password)

        # Given back as a variable: Ready, and still no ALTER ROLE … PASSWORD.
        monkeypatch.setenv(password_variable(tenant), password)
        restored = await redeployed.reconcile([tenant])
        assert restored.tenants[0].ready and restored.writes == 0
        assert await verifiers(dsn, [role]) == before

        # Deliberately started over: the role's password removed, a new one is generated.
        monkeypatch.delenv(password_variable(tenant))
        admin = await asyncpg.connect(dsn)
        await admin.execute(f'ALTER ROLE "{role}" PASSWORD NULL')
        await admin.close()
        renewed = await redeployed.reconcile([tenant])
        assert renewed.tenants[0].ready
        new_password = await empty.get_password(tenant)
        assert new_password not in (None, password) and await can_log_in(stack, role, new_password or "")


async def test_a_key_that_cannot_open_the_row_changes_nothing(stack: Stack, platform_dsn: str) -> None:
    tenant = make_tenant(unique("wrongkey"), "FREE")
    async with Replica(platform_dsn) as first:
        assert (await first.reconcile([tenant])).tenants[0].ready
    before = await verifiers(platform_dsn, [tenant.database_name])
    async with Replica(platform_dsn, key=OTHER_KEY) as wrong:
        result = (await wrong.reconcile([tenant])).tenants[0]
    reason, message = condition(result, "SecretReady") or ("", "")
    assert not result.ready and reason == "SecretUnavailable" and "does not hold" in message
    assert await verifiers(platform_dsn, [tenant.database_name]) == before


async def test_plan_creates_no_table(platform_dsn: str) -> None:
    async with Replica(platform_dsn) as replica:
        result = await replica.reconcile([make_tenant(unique("dry"), "FREE")], dry_run=True)
        assert "(a password would be generated into the tenant's Secret)" in result.tenants[0].plans["postgres"]
        conn = await asyncpg.connect(platform_dsn)
        try:
            assert await conn.fetchval("SELECT to_regnamespace('dynabase')") is None
        finally:
            await conn.close()


async def test_memory_store_of_a_new_engine_reports_missing_too(stack: Stack) -> None:
    """The engine's rule, whatever the store: here the in-memory one a restarted test engine has."""
    dsn = stack.env["DYNABASE_POSTGRES_DSN"]
    tenant = make_tenant(unique("mem"), "FREE")
    async with Replica(dsn, MemorySecretStore()) as first:
        assert (await first.reconcile([tenant])).tenants[0].ready
    before = await verifiers(dsn, [tenant.database_name])
    async with Replica(dsn, MemorySecretStore()) as second:
        result = (await second.reconcile([tenant])).tenants[0]
    assert condition(result, "SecretReady") is not None and not result.ready
    assert await verifiers(dsn, [tenant.database_name]) == before


# -- secrets never shown -----------------------------------------------------------------------------------

async def test_passwords_never_reach_logs_status_or_plans(stack: Stack, platform_dsn: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    tenants = [make_tenant(unique("quiet"), "FREE") for _ in range(2)]
    caplog.set_level(logging.DEBUG)
    async with Replica(platform_dsn) as replica:
        created = await replica.reconcile(tenants)
        passwords = [await replica.secrets.get_password(t) for t in tenants]
        store_repr = repr(replica.store) + repr(replica.secrets)
    async with Replica(platform_dsn) as again:
        planned = await again.reconcile(tenants, dry_run=True)
        statuses = await again.statuses.load([t.key for t in tenants])
    shown = "\n".join([caplog.text, created.render(), planned.render(), repr(created.tenants), store_repr,
                       json.dumps({k: v.model_dump(mode="json") for k, v in statuses.items()})])
    assert len(statuses) == 2 and all(p and p not in shown for p in passwords) and KEY not in shown
    assert any("PASSWORD '***'" in line for t in created.tenants for line in t.plans["postgres"])


# -- the headless process, restarted with nothing on disk, and its standby ----------------------------------

def headless(tmp_path: Path, name: str, dsn: str, source: Path, port: int) -> subprocess.Popen[str]:
    """`dynabase headless` as Railway starts it: no flags but --host, everything else from variables."""
    home = tmp_path / name  # a fresh, empty home: no secrets, no cache
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNABASE_", "XDG_"))}
    env.update({"HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
                "PORT": str(port), "DYNABASE_GITOPS_URL": str(source), "DYNABASE_POSTGRES_DSN": dsn,
                "DYNABASE_SECRETS_KEY": KEY, "DYNABASE_INTERVAL": "1s", "DYNABASE_LOG_LEVEL": "DEBUG"})
    return subprocess.Popen([sys.executable, "-m", "dynabase.cli", "headless", "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_status(proc: subprocess.Popen[str], port: int, done: Any, what: str, timeout: float = 60) -> None:
    """Poll /status until ``done(status)``; fails at once if the process ends."""
    deadline, status = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"headless ended ({proc.returncode}) before {what}: {proc.communicate()[0]}")
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).json()
        except httpx.TransportError:
            status = {}
        if status and done(status):
            return
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout}s: {status}")


def active_and_ready(keys: list[str]) -> Any:
    return lambda status: status["active"] and status["passes"] >= 1 and all(
        status["tenants"].get(k, {}).get("ready") for k in keys)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=20)
    return output


def tenant_file(folder: Path, name: str, db: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata:\n  name: {name}\n  namespace: hl\n"
        f"spec:\n  orgId: org-{name}\n  tier: FREE\n  databaseName: {db}\n")


async def test_a_replica_taking_over_with_an_empty_disk_changes_no_password(stack: Stack, platform_dsn: str,
                                                                           tmp_path: Path) -> None:
    source = tmp_path / "gitops"
    source.mkdir()
    (source / "tierpolicy.yaml").write_text((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    suffix = uuid.uuid4().hex[:6]
    roles = [f"hlr_{i}_{suffix}" for i in range(3)]
    for i, db in enumerate(roles):
        tenant_file(source, f"t{i}", db)
    keys = [f"hl/t{i}" for i in range(3)]
    ports = free_port(), free_port()
    first = headless(tmp_path, "first", platform_dsn, source, ports[0])
    second: subprocess.Popen[str] | None = None
    logs = []
    try:
        wait_for_status(first, ports[0], active_and_ready(keys), "the first replica's pass")
        before = await verifiers(platform_dsn, roles)
        assert len(before) == 3 and all(before.values())
        second = headless(tmp_path, "second", platform_dsn, source, ports[1])
        wait_for_status(second, ports[1], lambda status: not status["active"], "the second replica on standby")
        logs.append(stop(first))  # a redeploy: the active replica goes, the other takes the lock
        wait_for_status(second, ports[1], active_and_ready(keys), "the second replica's pass")
        assert await verifiers(platform_dsn, roles) == before
    finally:
        logs += [stop(p) for p in (first, second) if p is not None and p.returncode is None]
    assert list((tmp_path / "second").rglob("*")) == []  # nothing on the replica's disk
    pool = await asyncpg.create_pool(platform_dsn, min_size=1, max_size=1)
    try:
        store = PostgresSecretStore(pool, SecretsKeyring.parse(KEY))
        passwords = [await store.get_password(TenantDatabase.model_validate(yaml.safe_load(
            (source / f"t{i}.yaml").read_text()))) for i in range(len(roles))]
    finally:
        await pool.close()
    for role, password in zip(roles, passwords, strict=True):
        assert password is not None and await can_log_in(stack, role, password)
    assert all(p not in text and KEY not in text for p in passwords if p for text in logs)
