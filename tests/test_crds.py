"""The generated CRDs against the real kube-apiserver."""

from __future__ import annotations

import uuid

import pytest
import yaml

from dynabase.cli import main as dynabase_main
from dynabase.spec.crd import all_crds

from .conftest import ROOT, Stack
from .manifests import SHARED_BAD, tenant

pytestmark = pytest.mark.kube


def test_checked_in_crds_match_the_models() -> None:
    assert dynabase_main(["crds", "--check", "--out", str(ROOT / "crds")]) == 0, (
        "crds/ is out of date: run `dynabase crds`"
    )


def test_crds_are_structural_with_status_and_columns() -> None:
    tenant_crd = next(c for c in all_crds() if c["spec"]["names"]["kind"] == "TenantDatabase")
    version = tenant_crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0] == [
        "Org", "Tier", "Phase", "Ready", "Age",
    ]
    text = yaml.safe_dump(tenant_crd)
    assert "$ref" not in text and "anyOf" not in text


def _namespace(stack: Stack) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    stack.kubectl("create", "namespace", name)
    return name


def test_examples_apply_and_show_printer_columns(stack: Stack, crds_applied: None) -> None:
    ns = _namespace(stack)
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    for path in sorted((ROOT / "examples" / "tenants").glob("*.yaml")):
        manifest = path.read_text().replace("namespace: default", f"namespace: {ns}")
        stack.kubectl("apply", "-n", ns, "-f", "-", input=manifest)
    out = stack.kubectl("get", "tenantdatabases", "-n", ns).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "ORG", "TIER", "PHASE", "READY", "AGE"]
    assert "org-acme" in out and "ENTERPRISE" in out
    short = stack.kubectl("get", "tdb", "-n", ns, "-o", "name").stdout.split()
    assert len(short) == 4
    policy = stack.kubectl("get", "tierpolicy", "default", "-o", "yaml").stdout
    assert "statementTimeout: 10s" in policy


@pytest.mark.parametrize(("case", "manifest", "fragment"), SHARED_BAD, ids=[c[0] for c in SHARED_BAD])
def test_apiserver_rejects_with_the_same_message(
    stack: Stack, crds_applied: None, case: str, manifest: str, fragment: str
) -> None:
    result = stack.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("spec", "name", "fragment"),
    [
        ("orgId: o\ntier: free\n", "lower", "should match '^[A-Z][A-Z0-9_]{0,31}$'"),
        ("orgId: o\ntier: FREE\ndatabaseName: \"x; drop table y\"\n", "inject", "spec.databaseName"),
        ("orgId: o\ntier: FREE\nsizeLimit: 3\n", "unknown", 'unknown field "spec.sizeLimit"'),
        ("orgId: o\ntier: FREE\n", "pg-evil", "set spec.databaseName explicitly"),
        ("tier: FREE\n", "noorg", "spec.orgId: Required value"),
    ],
)
def test_bad_tenant_database_rejected_by_apiserver(
    stack: Stack, crds_applied: None, spec: str, name: str, fragment: str
) -> None:
    result = stack.kubectl("apply", "-f", "-", input=tenant(name, spec), check=False)
    assert result.returncode != 0
    assert fragment in result.stderr, result.stderr


def test_database_name_is_immutable(stack: Stack, crds_applied: None) -> None:
    ns = _namespace(stack)
    stack.kubectl("apply", "-f", "-", input=tenant("imm", "orgId: o\ntier: FREE\ndatabaseName: imm_a\n", ns))
    result = stack.kubectl(
        "apply", "-f", "-", input=tenant("imm", "orgId: o\ntier: FREE\ndatabaseName: imm_b\n", ns), check=False
    )
    assert result.returncode != 0
    assert "databaseName is immutable" in result.stderr
