"""Headless mode: manifests from a folder or a git repository, reconciled each pass."""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from dynabase.headless.http import serve
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource, GitSource

from .conftest import ROOT, Stack
from .engine_helpers import FakeClock, make_engine


def tenant_yaml(name: str, db: str, tier: str, **extra: str) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return (f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata:\n  name: {name}\n"
            f"  namespace: gitops\nspec:\n  orgId: org-{name}\n  tier: {tier}\n  databaseName: {db}\n{lines}")


@pytest.fixture
async def env(stack: Stack, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    clock = FakeClock()
    engine, _, statuses = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    folder = tmp_path / "repo"
    (folder / "tenants").mkdir(parents=True)
    (folder / "tierpolicy.yaml").write_text((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    suffix = uuid.uuid4().hex[:6]
    try:
        yield {"engine": engine, "clock": clock, "folder": folder, "suffix": suffix, "stack": stack,
               "statuses": statuses}
    finally:
        await engine.postgres.close()


async def connlimit(stack: Stack, role: str) -> Any:
    conn = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        return await conn.fetchrow("SELECT rolconnlimit, rolcanlogin FROM pg_roles WHERE rolname = $1", role)
    finally:
        await conn.close()


async def test_a_merged_tier_change_is_live_after_one_pass(env: dict[str, Any]) -> None:
    folder, s = env["folder"], env["suffix"]
    db = f"hl_a_{s}"
    (folder / "tenants" / "a.yaml").write_text(tenant_yaml("a", db, "FREE"))
    headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=env["clock"])
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolconnlimit"] == 5
    (folder / "tenants" / "a.yaml").write_text(tenant_yaml("a", db, "PRO"))  # the PR is merged
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolconnlimit"] == 50
    status = headless.status()
    assert status["tenants"]["gitops/a"]["tier"] == "PRO" and status["tenants"]["gitops/a"]["ready"]


async def test_invalid_file_is_reported_and_its_tenant_kept(env: dict[str, Any]) -> None:
    folder, s = env["folder"], env["suffix"]
    a, b = f"hl_keep_{s}", f"hl_other_{s}"
    (folder / "tenants" / "a.yaml").write_text(tenant_yaml("a", a, "STARTER"))
    (folder / "tenants" / "b.yaml").write_text(tenant_yaml("b", b, "FREE"))
    headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=env["clock"],
                                  confirm_deletion=dt.timedelta(0))
    await headless.run_once()
    (folder / "tenants" / "a.yaml").write_text(tenant_yaml("a", a, "starter"))  # a typo in a PR
    (folder / "tenants" / "b.yaml").write_text(tenant_yaml("b", b, "PRO"))
    await headless.run_once()
    errors = headless.status()["invalidManifests"]
    assert len(errors) == 1 and "a.yaml:8: TenantDatabase/a: spec.tier" in errors[0]
    assert (await connlimit(env["stack"], a))["rolcanlogin"] is True  # not deleted, still as it was
    assert (await connlimit(env["stack"], a))["rolconnlimit"] == 10
    assert (await connlimit(env["stack"], b))["rolconnlimit"] == 50  # the others go on


async def test_removed_tenant_is_deleted_only_after_the_confirmation_window(env: dict[str, Any]) -> None:
    folder, s, clock = env["folder"], env["suffix"], env["clock"]
    db = f"hl_gone_{s}"
    (folder / "tenants" / "gone.yaml").write_text(tenant_yaml("gone", db, "FREE"))
    headless = HeadlessReconciler(env["engine"], DirectorySource(folder), clock=clock,
                                  confirm_deletion=dt.timedelta(minutes=10))
    await headless.run_once()
    (folder / "tenants" / "gone.yaml").unlink()
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolcanlogin"] is True
    assert "gitops/gone" in headless.status()["pendingDeletion"]
    clock.advance(minutes=11)
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolcanlogin"] is False  # Retain: kept, login refused


async def test_one_active_replica_through_the_advisory_lock(env: dict[str, Any]) -> None:
    dsn = env["stack"].env["DYNABASE_POSTGRES_DSN"]
    first = HeadlessReconciler(env["engine"], DirectorySource(env["folder"]), lock_dsn=dsn)
    second = HeadlessReconciler(env["engine"], DirectorySource(env["folder"]), lock_dsn=dsn)
    try:
        assert await first.run_once() is not None
        assert await second.run_once() is None  # standby
        await first.release()
        assert await second.run_once() is not None  # takes over
    finally:
        await first.release()
        await second.release()


async def test_git_source_and_http_endpoints(env: dict[str, Any], tmp_path: Path) -> None:
    folder, s = env["folder"], env["suffix"]
    db = f"hl_git_{s}"
    (folder / "tenants" / "g.yaml").write_text(tenant_yaml("g", db, "FREE"))

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                       capture_output=True)

    git("init", "-q", "-b", "main")
    git("add", ".")
    git("commit", "-q", "-m", "tenants")
    source = GitSource(f"file://{folder}", "main", tmp_path / "cache")
    headless = HeadlessReconciler(env["engine"], source, clock=env["clock"])
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolconnlimit"] == 5
    (folder / "tenants" / "g.yaml").write_text(tenant_yaml("g", db, "STARTER"))
    git("commit", "-q", "-am", "upgrade g")
    await headless.run_once()
    assert (await connlimit(env["stack"], db))["rolconnlimit"] == 10

    from dynabase.devstack.stack import free_port

    port = free_port()
    runner = await serve(headless, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/status") as resp:
                body = await resp.json()
            assert body["tenants"]["gitops/g"]["tier"] == "STARTER" and body["source"].startswith("git ref main")
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert "dynabase_reconcile_duration_seconds" in await resp.text()
    finally:
        await runner.cleanup()
