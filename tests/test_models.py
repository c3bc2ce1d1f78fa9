from __future__ import annotations

import pytest

from dynabase.spec import TenantDatabase
from dynabase.spec.documents import parse_documents

from .manifests import SHARED_BAD, policy, tenant


def errors_of(text: str) -> list[str]:
    return [str(e) for e in parse_documents(text, "m.yaml").errors]


@pytest.mark.parametrize(("case", "manifest", "fragment"), SHARED_BAD, ids=[c[0] for c in SHARED_BAD])
def test_cross_field_rules_give_the_shared_message(case: str, manifest: str, fragment: str) -> None:
    errors = errors_of(manifest)
    assert len(errors) == 1, errors
    assert fragment in errors[0]
    assert errors[0].startswith("m.yaml:")


@pytest.mark.parametrize(
    ("manifest", "where", "fragments"),
    [
        (tenant("a", "orgId: o\ntier: free\n"), "spec.tier", ["'free'", "FREE"]),
        (
            tenant("a", "orgId: o\ntier: FREE\ndatabaseName: \"x; DROP TABLE y\"\n"),
            "spec.databaseName",
            ["x; DROP TABLE y", "lower case"],
        ),
        (tenant("a", "orgId: o\ntier: FREE\nsizeLimit: 3\n"), "spec.sizeLimit", ["unknown field"]),
        (tenant("a", "tier: FREE\n"), "spec.orgId", ["required"]),
        (tenant("a", "orgId: o\ntier: FREE\ndeletionPolicy: Keep\n"), "spec.deletionPolicy", ["Retain", "Delete"]),
        (
            policy("p", "FREE:\n  rank: 0\n  postgres:\n    connectionLimit: -5\n"),
            "connectionLimit",
            ["-1", "-5"],
        ),
        (
            policy("p", "FREE:\n  rank: 0\n  postgres:\n    statementTimeout: 10 seconds\n"),
            "statementTimeout",
            ["'10 seconds' is not a duration", "10s"],
        ),
        (
            policy("p", "FREE:\n  rank: 0\n  redis:\n    maxMemory: lots\n"),
            "maxMemory",
            ["'lots' is not a size", "1GB"],
        ),
        (tenant("pg-evil", "orgId: o\ntier: FREE\n"), "pg-evil", ["set spec.databaseName explicitly"]),
    ],
)
def test_each_bad_input_class_names_field_value_and_fix(manifest: str, where: str, fragments: list[str]) -> None:
    errors = errors_of(manifest)
    assert errors, "expected a validation error"
    text = "\n".join(errors)
    assert where in text
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize(
    ("section", "line", "fragment"),
    [
        ("postgres", "workMem: 4GB", "workMem must be between 64kB and 2GB (got 4GB); for example workMem: 4MB"),
        ("postgres", "tempBuffers: 1B", "tempBuffers must be between 800kB and"),
        ("postgres", "statementTimeout: 30d", "statementTimeout must be at most 2147483647ms (got 30d)"),
        ("postgres", "workMem: ' 4MB'", "' 4MB' is not a size"),  # taken as written, as the CRD does
        ("pgbouncer", "poolSize: '5'", "valid integer"),  # strict like the apiserver
        ("pgbouncer", "poolSize: true", "valid integer"),
        ("railway", "sleepApplication: 'yes'", "valid boolean"),
        ("billing", "baseFeeUSD: .inf", "finite number"),
        ("redis", "maxKeys: 9223372036854775808", "not a 64-bit integer"),
    ],
)
def test_limits_are_refused_as_the_crd_refuses_them(section: str, line: str, fragment: str) -> None:
    errors = errors_of(policy("p", f"FREE:\n  rank: 0\n  {section}:\n    {line}\n"))
    assert len(errors) == 1 and fragment in errors[0], errors


def test_a_whole_number_written_as_a_float_is_an_integer() -> None:
    manifest = policy("p", "FREE:\n  rank: 0\n  pgbouncer:\n    poolSize: 5.0\n")
    (document,) = parse_documents(manifest, "m.yaml").documents
    assert document.resource.spec.tiers["FREE"].pgbouncer.pool_size == 5  # type: ignore[union-attr]


def test_error_points_at_the_offending_line() -> None:
    manifest = policy("p", "FREE:\n  rank: 0\n  proxy:\n    qps: 100\n    burst: 10\n")
    burst_line = [line.strip() for line in manifest.splitlines()].index("burst: 10") + 1
    (error,) = parse_documents(manifest, "tiers.yaml").errors
    assert error.line == burst_line
    assert str(error).startswith(f"tiers.yaml:{burst_line}: TierPolicy/p: spec.tiers.FREE.proxy.burst: ")


def test_all_errors_in_all_documents_are_reported() -> None:
    text = "\n---\n".join(
        [
            tenant("a", "orgId: o\ntier: free\n"),
            tenant("b", "orgId: o\ntier: FREE\n"),
            tenant("c", "orgId: \"has space\"\ntier: FREE\nextra: 1\n"),
        ]
    )
    result = parse_documents(text, "m.yaml")
    assert [d.resource.name for d in result.documents] == ["b"]
    assert len(result.errors) == 3
    assert {e.name for e in result.errors} == {"a", "c"}
    assert result.invalid_keys == {("TenantDatabase", "default/a"), ("TenantDatabase", "default/c")}


def test_invalid_yaml_and_unknown_kind_are_reported_with_lines() -> None:
    assert errors_of("a: [1, 2\n")[0].startswith("m.yaml:2: document: invalid YAML")
    unknown = errors_of("apiVersion: dynabase.io/v1alpha1\nkind: Tenant\nmetadata: {name: x}\n")
    assert "unknown kind 'Tenant'" in unknown[0]


def test_database_name_defaults_from_resource_name() -> None:
    result = parse_documents(tenant("acme-prod", "orgId: o\ntier: FREE\n"), "m.yaml")
    resource = result.documents[0].resource
    assert isinstance(resource, TenantDatabase)
    assert resource.database_name == "acme_prod"
    assert resource.spec.deletion_policy == "Retain"
    assert resource.spec.tier_policy_ref == "default"


def test_a_resource_declared_twice_is_an_error_on_the_second(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dynabase.spec.documents import load_paths

    (tmp_path / "a.yaml").write_text(tenant("dup", "orgId: o\ntier: FREE\n"))
    (tmp_path / "b.yaml").write_text(tenant("dup", "orgId: o\ntier: PRO\n"))
    result = load_paths([tmp_path])
    assert [d.file for d in result.documents] == [str(tmp_path / "a.yaml")]
    error = str(result.errors[0])
    assert "declared twice (first at" in error and error.startswith(str(tmp_path / "b.yaml"))
