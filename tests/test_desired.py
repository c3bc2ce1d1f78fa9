"""Pure planning: effective limits, transitions, quoting (checked against the server)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynabase.desired.effective import PostgresEffective, ResolveError, effective_limits, merge
from dynabase.desired.postgres import render_kilobytes
from dynabase.desired.postgres_observed import connect_grantees
from dynabase.desired.scram import scram_verifier, verifier_matches
from dynabase.desired.sql import quote_ident, quote_literal
from dynabase.desired.transition import decide_tier
from dynabase.spec import TierPolicy
from dynabase.spec.limits import BURST_COVERS_QPS, POOL_FITS

from .conftest import Stack
from .engine_helpers import example_policy, make_tenant

POLICY = example_policy()
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def test_overrides_merge_field_by_field_over_the_tier_and_defaults_fill_the_rest() -> None:
    tenant = make_tenant("x", "STARTER", overrides={"postgres": {"connectionLimit": 15}, "proxy": {"qps": 60}})
    limits = effective_limits(tenant, POLICY, "STARTER")
    assert limits.postgres.connection_limit == 15  # override
    assert limits.postgres.statement_timeout is not None and limits.postgres.statement_timeout.seconds == 30
    assert limits.proxy.qps == 60 and limits.proxy.burst == 100  # burst from the tier
    assert limits.proxy.over_limit == "throttle"  # default
    assert effective_limits(make_tenant("y", "ENTERPRISE"), POLICY, "ENTERPRISE").proxy.qps is None


def test_override_that_breaks_a_rule_is_a_clear_per_tenant_error() -> None:
    tenant = make_tenant("x", "FREE", overrides={"postgres": {"connectionLimit": 2}})
    with pytest.raises(ResolveError) as info:
        effective_limits(tenant, POLICY, "FREE")
    assert info.value.reason == "InvalidLimits" and "connectionLimit 2" in info.value.message


@pytest.mark.parametrize(
    ("tier", "override", "message"),
    [
        # Each layer alone passes the CRD's rule; merged (or with a default) they break it.
        ({"postgres": {"connectionLimit": 10}, "pgbouncer": {"poolSize": 5}}, {"postgres": {"connectionLimit": 4}},
         POOL_FITS.message),
        ({"postgres": {"connectionLimit": 3}}, None, POOL_FITS.message),  # the default pool of 5
        ({"proxy": {"qps": 10, "burst": 20}}, {"proxy": {"burst": 5}}, BURST_COVERS_QPS.message),
    ],
)
def test_merged_limits_are_checked_with_the_crds_rules(tier: dict[str, Any], override: dict[str, Any] | None,
                                                       message: str) -> None:
    policy = TierPolicy.model_validate({"apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy",
                                        "metadata": {"name": "p"}, "spec": {"tiers": {"T": {"rank": 0, **tier}}}})
    tenant = make_tenant("x", "T", overrides=override)
    with pytest.raises(ResolveError) as info:
        effective_limits(tenant, policy, "T")
    assert message in info.value.message
    if override is None:  # nothing to fix in the tenant but its choice of tier
        assert info.value.message.startswith("tier T of TierPolicy 'p': ") and info.value.field == "spec.tier"
    else:
        assert info.value.message.startswith("tier T of TierPolicy 'p' with the overrides: ")
        assert info.value.field is not None and info.value.field.startswith("spec.overrides.")


def test_defaults_come_from_the_declarations() -> None:
    limits = merge("T", 0, [])
    assert limits.postgres == PostgresEffective() and limits.postgres.connection_limit == 10
    assert (limits.pgbouncer.pool_size, limits.pgbouncer.pool_mode) == (5, "transaction")
    assert limits.proxy.queue_timeout.milliseconds == 1000 and limits.proxy.burst is None
    declared = TierPolicy.model_validate({"apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy",
                                          "metadata": {"name": "p"},
                                          "spec": {"tiers": {"T": {"rank": 0, "proxy": {"qps": 7}}}}})
    assert merge("T", 0, [declared.spec.tiers["T"]]).proxy.burst == 7  # burst defaults to qps


@pytest.mark.parametrize(
    ("applied", "declared", "pending", "at", "expect_tier", "expect_pending", "change"),
    [
        (None, "FREE", None, None, "FREE", None, "initial"),
        ("FREE", "PRO", None, None, "PRO", None, "upgrade"),
        ("PRO", "FREE", None, None, "PRO", "FREE", "scheduled"),
        ("PRO", "FREE", "FREE", NOW + dt.timedelta(minutes=1), "PRO", "FREE", "scheduled"),
        ("PRO", "FREE", "FREE", NOW - dt.timedelta(seconds=1), "FREE", None, "downgrade"),
        ("PRO", "PRO", "FREE", NOW + dt.timedelta(minutes=1), "PRO", None, "cancelled"),
        ("PRO", "STARTER", "FREE", NOW + dt.timedelta(minutes=1), "PRO", "STARTER", "scheduled"),
        ("GONE", "FREE", None, None, "FREE", None, "lateral"),
    ],
)
def test_tier_transitions(applied, declared, pending, at, expect_tier, expect_pending, change) -> None:  # type: ignore[no-untyped-def]
    decision = decide_tier(
        make_tenant("x", declared), POLICY, applied_tier=applied, pending_tier=pending, effective_at=at, now=NOW
    )
    assert (decision.applied_tier, decision.pending_tier, decision.change) == (expect_tier, expect_pending, change)


def test_downgrade_grace_restarts_when_the_target_changes() -> None:
    decision = decide_tier(make_tenant("x", "STARTER"), POLICY, applied_tier="PRO", pending_tier="FREE",
                           effective_at=NOW + dt.timedelta(minutes=1), now=NOW)
    assert decision.effective_at == NOW + dt.timedelta(minutes=15)


def test_connect_grantees_reads_datacl() -> None:
    assert connect_grantees(None, "o") == {"", "o"}
    assert connect_grantees(["=T/o", "o=CTc/o", "dynabase_pgbouncer=c/o"], "o") == {"o", "dynabase_pgbouncer"}
    assert connect_grantees(['"we""ird"=c/o'], "o") == {'we"ird'}


def test_render_kilobytes_uses_postgres_units() -> None:
    assert render_kilobytes(4 * 1024**2) == "4MB"
    assert render_kilobytes(1024**3) == "1GB"
    assert render_kilobytes(800 * 1024) == "800kB"


def test_scram_verifier_matches_only_its_password() -> None:
    verifier = scram_verifier("s3cret")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert verifier_matches(verifier, "s3cret") and not verifier_matches(verifier, "other")
    assert not verifier_matches("md5abc", "s3cret") and not verifier_matches(None, "s3cret")


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
)


@pytest.fixture(scope="module")
def pg_dsn(stack: Stack) -> str:
    return stack.env["DYNABASE_POSTGRES_DSN"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_TEXT, value=_TEXT)
async def test_quoting_round_trips_through_the_real_server(pg_dsn: str, name: str, value: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        # Identifiers longer than 63 bytes are truncated by the server, as for any client.
        if len(name.encode()) <= 63:
            record = await conn.fetchrow(f"SELECT 1 AS {quote_ident(name)}")
            assert list(record.keys()) == [name]
        assert await conn.fetchval(f"SELECT {quote_literal(value)}::text") == value
    finally:
        await conn.close()


@pytest.mark.parametrize("evil", ['x"; DROP ROLE postgres; --', "a'b", "robert'); DROP TABLE students;--"])
async def test_injection_attempts_are_data_not_sql(pg_dsn: str, evil: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"CREATE TEMP TABLE {quote_ident(evil)} (v text)")
        await conn.execute(f"INSERT INTO {quote_ident(evil)} VALUES ({quote_literal(evil)})")
        assert await conn.fetchval(f"SELECT v FROM {quote_ident(evil)}") == evil
        assert await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'postgres'") == 1
    finally:
        await conn.close()
