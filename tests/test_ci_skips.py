"""The suite cannot go green in CI by skipping: a test whose real server is missing is a
failure when CI=true, and a test asking for a server must carry that server's marker."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, cast

import pytest

from .conftest import ROOT, Stack, missing_server

FERRETDB_TEST = "tests/test_devstack.py::test_ferretdb_answers_pymongo_with_scram"


def run_pytest(ci: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The suite's own conftest in a child pytest, with FerretDB's binary pointing nowhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env |= {"TEST_ASSET_FERRETDB": "/nonexistent/ferretdb", "DYNABASE_BUILD_BINARIES": "0"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_server_fails_the_run_in_ci() -> None:
    ci = run_pytest("true", FERRETDB_TEST)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "TEST_ASSET_FERRETDB=/nonexistent/ferretdb is not an executable file" in ci.stdout, ci.stdout
    assert "CI=true" in ci.stdout and "1 error" in ci.stdout and "skipped" not in ci.stdout, ci.stdout


def test_a_missing_server_is_a_skip_with_its_reason_outside_ci() -> None:
    local = run_pytest(None, FERRETDB_TEST)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 skipped" in local.stdout and "ferretdb unavailable here" in local.stdout, local.stdout


def test_deselecting_the_marker_leaves_the_test_out() -> None:
    deselected = run_pytest("true", "-m", "not mongo", FERRETDB_TEST)
    assert deselected.returncode == 5 and "1 deselected" in deselected.stdout, deselected.stdout


def unstarted_stack(missing: dict[str, str]) -> Stack:
    return Stack(cast(Any, None), {}, missing)


def test_asking_for_a_server_without_its_marker_fails() -> None:
    # This test carries no marker: asking for FerretDB is the mistake, whether or not it runs here.
    with pytest.raises(pytest.fail.Exception, match=r"not marked @pytest.mark.mongo"):
        unstarted_stack({}).need("ferretdb")
    with pytest.raises(pytest.fail.Exception, match=r"not marked @pytest.mark.kube"):
        unstarted_stack({}).need("kube-apiserver")
    unstarted_stack({}).need("postgres", "redis")  # always in the devstack: no marker


def test_missing_server_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="ferretdb unavailable here: not built"):
        missing_server("ferretdb unavailable here: not built")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing_server("ferretdb unavailable here: not built")
