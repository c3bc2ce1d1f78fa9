"""The first run: `dynabase apply` of the examples plus many tenants on a Postgres fresh from initdb.

A first pass creates the platform's tables (status, sealed passwords) while many tenants
record their status at once; concurrent ``CREATE SCHEMA/TABLE IF NOT EXISTS`` once failed
such a run after it had done its work. Every creator goes through the platform schema lock
(``backends/platform_schema.py``); this runs the command as a user would, in a subprocess.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import ROOT
from .fresh_postgres import FreshPostgres, fresh_postgres
from .manifests import tenant

TENANTS = 50
TIERS = ("FREE", "STARTER", "PRO", "ENTERPRISE")


@pytest.fixture(scope="module")
def postgres() -> Iterator[FreshPostgres]:
    with fresh_postgres() as fresh:
        yield fresh


def _manifests(folder: Path) -> None:
    """The examples (policy and tenants) and generated tenants up to ``TENANTS``."""
    shutil.copy(ROOT / "examples" / "tierpolicy-default.yaml", folder / "tierpolicy.yaml")
    examples = sorted((ROOT / "examples" / "tenants").glob("*.yaml"))
    for path in examples:
        shutil.copy(path, folder / path.name)
    for i in range(TENANTS - len(examples)):
        (folder / f"org-{i:02}.yaml").write_text(tenant(f"org-{i:02}", f"orgId: org-{i:02}\ntier: {TIERS[i % 4]}\n"))


def _apply(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynabase.cli", "apply", str(folder)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_first_apply_of_many_tenants_on_a_fresh_postgres_succeeds(postgres: FreshPostgres, tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    _manifests(folder)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DYNABASE_", "PG"))},
        "DYNABASE_POSTGRES_DSN": postgres.dsn,
        # Passwords sealed in Postgres: their table is created in the same first pass.
        "DYNABASE_SECRETS_KEY": base64.b64encode(os.urandom(32)).decode(),
        "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    with psycopg.connect(postgres.dsn) as conn:  # fresh: nothing of the platform's yet
        assert conn.execute("SELECT to_regnamespace('dynabase')").fetchone() == (None,)

    first = _apply(folder, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"{TENANTS}/{TENANTS} tenant(s) ready" in first.stdout
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute("SELECT status FROM dynabase.tenant_status").fetchall()
        sealed = conn.execute("SELECT count(*) FROM dynabase.tenant_secrets").fetchone()
        roles = conn.execute("SELECT count(*) FROM pg_roles WHERE rolcanlogin AND rolname <> ALL(%s)",
                             (["postgres", "dynabase_pgbouncer"],)).fetchone()
    ready = [next(c for c in row[0]["conditions"] if c["type"] == "Ready")["status"] for row in rows]
    assert ready == ["True"] * TENANTS and sealed == (TENANTS,) and roles == (TENANTS,)

    # The second run finds everything in place: nothing to write, still exit 0.
    second = _apply(folder, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    written = re.search(r"(\d+) statement\(s\) written", second.stdout)
    assert written is not None and written[1] == "0", second.stdout[-2000:]
