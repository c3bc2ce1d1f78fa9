"""The pull-request review: `dynabase plan --base REF` on a real git repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dynabase.cli import main

from .conftest import ROOT


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tenants").mkdir()
    (tmp_path / "tierpolicy.yaml").write_text((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    for name in ("acme", "globex"):
        (tmp_path / "tenants" / f"{name}.yaml").write_text((ROOT / "examples" / "tenants" / f"{name}.yaml").read_text())
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "base")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_upgrade_and_downgrade_show_their_limits(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acme, globex = repo / "tenants" / "acme.yaml", repo / "tenants" / "globex.yaml"
    acme.write_text(acme.read_text().replace("tier: FREE", "tier: PRO"))
    globex.write_text(globex.read_text().replace("tier: PRO", "tier: STARTER"))
    assert main(["plan", "--base", "main", "."]) == 2
    out = capsys.readouterr().out
    assert "`default/acme`: **FREE** → **PRO** (upgrade)" in out and "applies at once" in out
    assert "| postgres | connections | 5 | 50 |" in out and "| proxy | queries/s | 10 | 200 |" in out
    assert "`default/globex`: **PRO** → **STARTER** (downgrade)" in out and "15m grace period" in out


def test_no_change_exits_0_and_an_invalid_manifest_fails_with_its_line(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--base", "main", "."]) == 0
    assert "No tenant changes." in capsys.readouterr().out
    acme = repo / "tenants" / "acme.yaml"
    acme.write_text(acme.read_text().replace("tier: FREE", "tier: free"))
    assert main(["plan", "--base", "main", "."]) == 1
    assert "tenants/acme.yaml:8: TenantDatabase/acme: spec.tier" in capsys.readouterr().err


def test_new_and_removed_tenants(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "tenants" / "globex.yaml").unlink()
    (repo / "tenants" / "new.yaml").write_text(
        "apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata: {name: newco, namespace: default}\n"
        "spec: {orgId: org-new, tier: STARTER}\n"
    )
    assert main(["plan", "--base", "main", "."]) == 2
    out = capsys.readouterr().out
    assert "`default/newco`: new, tier **STARTER**" in out
    assert "`default/globex`: removed (was **PRO**)" in out and "deletionPolicy Retain" in out
