"""Shared bench plumbing: a devstack in a temp dir and generated tenants."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from dynabase.devstack.stack import Devstack
from dynabase.spec import TenantDatabase, TierPolicy

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("FREE", "STARTER", "PRO", "ENTERPRISE")


@contextlib.contextmanager
def devstack(services: list[str]) -> Iterator[dict[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="dynabase-bench-"))
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
