"""The deployment manifests against the real apiserver, RBAC checked by impersonation."""

from __future__ import annotations

import pytest

from .conftest import ROOT, Stack

pytestmark = pytest.mark.kube
SA = "system:serviceaccount:dynabase-system:dynabase-operator"


def test_kustomize_manifests_apply(stack: Stack, crds_applied: None) -> None:
    out = stack.kubectl("apply", "-k", str(ROOT / "manifests"))
    assert "deployment.apps/dynabase-operator" in out.stdout
    assert "poddisruptionbudget.policy/dynabase-proxy" in out.stdout
    stack.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s")
    stack.kubectl("apply", "-f", str(ROOT / "manifests" / "peering"))
    deployment = stack.kubectl("get", "deployment", "dynabase-operator", "-n", "dynabase-system",
                               "-o", "jsonpath={.spec.template.spec.securityContext.runAsNonRoot}").stdout
    assert deployment == "true"


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("patch", "tenantdatabases.dynabase.io/status", True),
        ("watch", "tierpolicies.dynabase.io", True),
        ("create", "secrets", True),
        ("create", "events", True),
        ("delete", "secrets", False),
        ("delete", "tenantdatabases.dynabase.io", False),
        ("create", "pods", False),
        ("update", "tenantdatabases.dynabase.io", False),
    ],
)
def test_operator_rbac_is_least_privilege(stack: Stack, crds_applied: None, verb: str, resource: str,
                                          allowed: bool) -> None:
    stack.kubectl("apply", "-k", str(ROOT / "manifests"))
    if "/" in resource:
        kind, sub = resource.split("/")
        args = ["auth", "can-i", verb, kind, "--subresource", sub, "--as", SA, "-A"]
    else:
        args = ["auth", "can-i", verb, resource, "--as", SA, "-A"]
    result = stack.kubectl(*args, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr
