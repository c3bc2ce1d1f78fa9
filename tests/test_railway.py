"""Railway: documents valid against the real schema, the client's rate-limit
handling, and the engine converging services on a fake Railway (the one external
SaaS) while Postgres is the devstack's real one."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import graphql
import pytest

from dynabase.backends.railway import (
    BudgetExhausted,
    OwnService,
    RailwayAuth,
    RailwayBackend,
    RailwayClient,
    RailwayError,
    RateLimited,
)
from dynabase.backends.railway.client import document, operations
from dynabase.desired.railway import ServiceObserved, ServiceRef, ServiceTarget, plan_service, spread_replicas
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore

from .conftest import ROOT, Stack
from .engine_helpers import example_policy, make_engine, make_tenant, unique
from .railway.fake import SCHEMA_PATH, FakeRailway

POLICIES = {"default": example_policy()}
PROJECT, ENV = "proj-1", "env-prod"
PUBLISHED_SCHEMA = Path(os.environ.get("DYNABASE_RAILWAY_SCHEMA", ROOT.parent / "shared" / "railway" / "schema.json"))


# -- documents and schemas ------------------------------------------------------


def published_schema() -> graphql.GraphQLSchema:
    if not PUBLISHED_SCHEMA.exists():
        pytest.skip(f"Railway's published schema is not at {PUBLISHED_SCHEMA} (set DYNABASE_RAILWAY_SCHEMA)")
    return graphql.build_client_schema(json.loads(PUBLISHED_SCHEMA.read_text())["data"])


@pytest.mark.parametrize("operation", operations())
def test_document_is_valid_against_the_subset_schema(operation: str) -> None:
    schema = graphql.build_schema(SCHEMA_PATH.read_text())
    assert graphql.validate(schema, graphql.parse(document(operation))) == []


@pytest.mark.parametrize("operation", operations())
def test_document_is_valid_against_railways_published_schema(operation: str) -> None:
    errors = graphql.validate(published_schema(), graphql.parse(document(operation)))
    assert errors == [], [e.message for e in errors]


def test_the_subset_schema_agrees_with_railways_published_schema() -> None:
    """Every type, field, argument and enum value the fake serves exists in Railway's schema with the same type."""
    real, subset = published_schema(), graphql.build_schema(SCHEMA_PATH.read_text())
    problems: list[str] = []
    for name, mine in subset.type_map.items():
        if name.startswith("__") or name in ("String", "Int", "Float", "Boolean", "ID"):
            continue
        theirs = real.type_map.get(name)
        if theirs is None or type(theirs) is not type(mine):
            problems.append(f"{name}: missing or of another kind")
            continue
        if isinstance(mine, graphql.GraphQLEnumType):
            assert isinstance(theirs, graphql.GraphQLEnumType)
            problems += [f"{name}.{v}" for v in mine.values if v not in theirs.values]
        if isinstance(mine, graphql.GraphQLObjectType | graphql.GraphQLInputObjectType):
            assert isinstance(theirs, graphql.GraphQLObjectType | graphql.GraphQLInputObjectType)
            for field_name, field in mine.fields.items():
                other = theirs.fields.get(field_name)
                if other is None or str(other.type) != str(field.type):
                    problems.append(f"{name}.{field_name}: {field.type} vs {other.type if other else 'missing'}")
                    continue
                for arg, value in getattr(field, "args", {}).items():
                    other_arg = other.args.get(arg)  # type: ignore[union-attr]
                    if other_arg is None or str(other_arg.type) != str(value.type):
                        problems.append(f"{name}.{field_name}({arg})")
            if isinstance(theirs, graphql.GraphQLInputObjectType):
                required = [f for f, v in theirs.fields.items()
                            if graphql.is_non_null_type(v.type) and v.default_value is graphql.Undefined]
                problems += [f"{name}.{f} is required at Railway" for f in required if f not in mine.fields]
    assert problems == []


# -- pure planning --------------------------------------------------------------


def target(**kwargs: Any) -> ServiceTarget:
    values: dict[str, Any] = {"owner": "t/a", "ref": ServiceRef(PROJECT, ENV, "app"), "replicas": 2,
                              "sleep_application": False, "variables": {"PGPASSWORD": "s3cret", "A": "1"},
                              "secret_variables": frozenset({"PGPASSWORD"})}
    return ServiceTarget(**{**values, **kwargs})


def test_a_matching_service_plans_no_mutation() -> None:
    observed = ServiceObserved("svc", "app", region="us", regions={"us": 2}, sleep_application=False,
                               variables={"PGPASSWORD": "s3cret", "A": "1", "OTHER": "kept"})
    plan = plan_service(target(), observed)
    assert plan.mutations == 0 and plan.lines() == []


def test_plan_lines_name_secret_variables_but_never_show_their_values() -> None:
    plan = plan_service(target(), ServiceObserved("svc", "app", region="us", legacy_replicas=2,
                                                  sleep_application=False))
    text = "\n".join(plan.lines())
    assert "s3cret" not in text and "PGPASSWORD (secret)" in text and "A=1" in text
    assert plan.variables == {"PGPASSWORD": "s3cret", "A": "1"}
    assert plan.mutations == 2  # one upsert, one deploy


def test_replicas_are_spread_over_regions_in_proportion() -> None:
    assert spread_replicas(4, {"us": 1, "eu": 1}) == {"eu": 2, "us": 2}
    assert spread_replicas(5, {"us": 2, "eu": 1}) == {"eu": 2, "us": 3}
    assert spread_replicas(3, {"us": 0, "eu": 0}) == {"eu": 2, "us": 1}
    # The legacy numReplicas (1 here) is not trusted for multi-region services.
    observed = ServiceObserved("svc", "app", region="us", regions={"us": 1, "eu": 1}, legacy_replicas=1,
                               sleep_application=False, variables={"PGPASSWORD": "s3cret", "A": "1"})
    assert plan_service(target(replicas=2), observed).update == {}


# -- the client against the fake ------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeRailway]:
    server = FakeRailway("tok-abc123")
    await server.start()
    server.add_service(ENV, PROJECT, "app")
    try:
        yield server
    finally:
        await server.stop()


def client_for(fake: FakeRailway, **kwargs: Any) -> RailwayClient:
    return RailwayClient(RailwayAuth(fake.token, "project" if fake.kind == "project" else "account"),
                         url=fake.url, **kwargs)


async def test_429_is_retried_after_retry_after(fake: FakeRailway) -> None:
    client = client_for(fake)
    fake.fail_next(429, retry_after=0.2)
    try:
        data = await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
    assert data["environment"]["projectId"] == PROJECT
    assert fake.requests["EnvironmentState"] == 2


async def test_a_long_retry_after_fails_the_call_instead_of_blocking_the_pass(fake: FakeRailway) -> None:
    client = client_for(fake, max_wait=5)
    fake.fail_next(429, retry_after=600)
    try:
        with pytest.raises(RateLimited) as info:
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
    assert info.value.retry_after == 600 and fake.requests["EnvironmentState"] == 1


async def test_5xx_is_retried_with_backoff_then_reported(fake: FakeRailway) -> None:
    client = client_for(fake, attempts=3)
    fake.fail_next(502, times=2)
    try:
        await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
        fake.fail_next(503, times=3)
        with pytest.raises(RailwayError, match="HTTP 503"):
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
    assert fake.requests["EnvironmentState"] == 6


async def test_the_hourly_budget_stops_requests_before_railway_does(fake: FakeRailway) -> None:
    client = client_for(fake, hourly_budget=2)
    try:
        for _ in range(2):
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
        with pytest.raises(BudgetExhausted):
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
    assert fake.requests["EnvironmentState"] == 2


async def test_railways_remaining_header_tightens_the_budget(fake: FakeRailway) -> None:
    fake.limit_per_hour = fake.sent + 2  # Railway says: one request left after the next
    client = client_for(fake, hourly_budget=1000)
    try:
        await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
        await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
        with pytest.raises(BudgetExhausted):
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()


async def test_a_wrong_token_is_an_error_that_does_not_repeat_the_token(fake: FakeRailway) -> None:
    client = RailwayClient(RailwayAuth("wrong-secret-token"), url=fake.url)
    try:
        with pytest.raises(RailwayError) as info:
            await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
    assert "Not Authorized" in str(info.value) and "wrong-secret-token" not in str(info.value)
    assert "wrong-secret-token" not in repr(RailwayAuth("wrong-secret-token"))


async def test_a_project_token_is_sent_as_project_access_token() -> None:
    server = FakeRailway("proj-token", kind="project")
    await server.start()
    server.add_service(ENV, PROJECT, "app")
    client = client_for(server)
    try:
        await client.execute("EnvironmentState", {"environmentId": ENV, "after": None})
    finally:
        await client.close()
        await server.stop()
    assert server.seen_auth_headers[-1] == {"Project-Access-Token": "proj-token"}


async def test_usage_is_summed_per_service(fake: FakeRailway) -> None:
    fake.usage_rows = [
        {"measurement": "CPU_USAGE", "value": 30.0, "tags": {"serviceId": "db", "projectId": PROJECT}},
        {"measurement": "CPU_USAGE", "value": 12.5, "tags": {"serviceId": "db", "projectId": PROJECT}},
        {"measurement": "MEMORY_USAGE_GB", "value": 7.0, "tags": {"serviceId": "db", "projectId": PROJECT}},
    ]
    backend = RailwayBackend(client_for(fake), own=OwnService(None, None))
    try:
        usage = await backend.usage(PROJECT, dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
                                    dt.datetime(2026, 11, 1, tzinfo=dt.UTC), ["CPU_USAGE", "MEMORY_USAGE_GB"])
    finally:
        await backend.close()
    assert usage == {"db": {"CPU_USAGE": 42.5, "MEMORY_USAGE_GB": 7.0}}


# -- the engine converging Railway services --------------------------------------


@pytest.fixture
async def railway_engine(stack: Stack, fake: FakeRailway) -> AsyncIterator[tuple[Engine, MemorySecretStore]]:
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    engine.railway = RailwayBackend(client_for(fake), own=OwnService(None, None))
    try:
        yield engine, secrets
    finally:
        await engine.railway.close()
        await engine.postgres.close()


def railway_tenant(db: str, tier: str, service: str = "app") -> Any:
    return make_tenant(db, tier, railway={"projectId": PROJECT, "environmentId": ENV, "serviceName": service})


def outcome(result: Any, condition: str = "RailwayReady") -> Any:
    return next(o for o in result.outcomes if o.condition_type == condition)


async def test_engine_converges_a_service_then_a_second_pass_makes_no_mutation(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, secrets = railway_engine
    tenant = railway_tenant(unique("rw"), "FREE")
    result = await engine.reconcile_all(POLICIES, [tenant])
    assert outcome(result.tenants[0]).ok, result.tenants[0].outcomes
    service = fake.service(ENV, "app")
    assert (service.replicas, service.sleep_application) == (1, True)
    assert service.limits == {"vCPUs": 0.5, "memoryGB": 0.5}
    assert service.variables["PGPASSWORD"] == secrets.passwords[tenant.key]
    assert service.variables["DYNABASE_TIER"] == "FREE"
    assert fake.mutation_names == ["ServiceInstanceUpdate", "ServiceLimitsUpdate", "VariablesUpsert", "ServiceDeploy"]
    assert fake.mutations[2][1]["input"]["skipDeploys"] is True
    assert service.deployments == 1 and service.deploys_triggered_by_variables == 0
    assert "PGPASSWORD (secret)" in "\n".join(result.tenants[0].plans["railway"])
    assert secrets.passwords[tenant.key] not in result.render()

    fake.reset_counts()
    again = await engine.reconcile_all(POLICIES, [tenant])
    assert fake.mutations == [] and again.tenants[0].plans.get("railway") is None
    # One read of the environment; the limits were written by the first pass, so they are known.
    assert dict(fake.requests) == {"EnvironmentState": 1}


async def test_limits_changed_by_hand_are_found_when_the_cached_read_expires(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    assert engine.railway is not None
    tenant = railway_tenant(unique("rw"), "STARTER")
    await engine.reconcile_all(POLICIES, [tenant])
    service = fake.service(ENV, "app")
    service.limits = {"vCPUs": 4.0, "memoryGB": 8.0}  # someone raised them in the dashboard
    fake.reset_counts()
    await engine.reconcile_all(POLICIES, [tenant])
    assert fake.mutations == []  # still within the refresh window: not read again
    engine.railway.limits_refresh = 0
    await engine.reconcile_all(POLICIES, [tenant])
    assert service.limits == {"vCPUs": 1.0, "memoryGB": 1.0}
    assert fake.mutation_names == ["ServiceLimitsUpdate", "ServiceDeploy"]


async def test_limits_in_the_environment_config_save_the_extra_read(stack: Stack) -> None:
    server = FakeRailway("t", config_has_limits=True)
    await server.start()
    for name in ("a", "b", "c"):
        server.add_service(ENV, PROJECT, name)
    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    engine.railway = RailwayBackend(client_for(server), own=OwnService(None, None))
    tenants = [railway_tenant(unique(f"rw{n}"), "PRO", service=n) for n in ("a", "b", "c")]
    try:
        await engine.reconcile_all(POLICIES, tenants)
        server.reset_counts()
        await engine.reconcile_all(POLICIES, tenants)
    finally:
        await engine.railway.close()
        await engine.postgres.close()
        await server.stop()
    assert dict(server.requests) == {"EnvironmentState": 1} and server.mutations == []


async def test_drift_is_reverted_with_a_single_deploy(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    tenant = railway_tenant(unique("rw"), "PRO")
    await engine.reconcile_all(POLICIES, [tenant])
    service = fake.service(ENV, "app")
    deployments = service.deployments
    service.num_replicas, service.sleep_application = 7, True  # someone scaled it by hand
    service.variables["DYNABASE_TIER"] = "ENTERPRISE"
    service.variables["UNMANAGED"] = "left alone"
    fake.reset_counts()
    result = await engine.reconcile_all(POLICIES, [tenant])
    assert (service.replicas, service.sleep_application) == (2, False)
    assert service.variables["DYNABASE_TIER"] == "PRO" and service.variables["UNMANAGED"] == "left alone"
    assert fake.mutation_names == ["ServiceInstanceUpdate", "VariablesUpsert", "ServiceDeploy"]
    assert service.deployments == deployments + 1
    assert outcome(result.tenants[0]).ok


async def test_tier_change_rescales_a_multi_region_service(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    service = fake.add_service(ENV, PROJECT, "multi", regions={"us-west2": 1, "europe-west4": 1})
    db = unique("rw")
    await engine.reconcile_all(POLICIES, [railway_tenant(db, "PRO", service="multi")])
    assert service.regions == {"us-west2": 1, "europe-west4": 1}  # PRO: 2 replicas, as it was
    await engine.reconcile_all(POLICIES, [railway_tenant(db, "ENTERPRISE", service="multi")])
    assert service.regions is not None and sum(service.regions.values()) == 3
    assert set(service.regions) == {"us-west2", "europe-west4"}


async def test_a_missing_service_or_the_reconcilers_own_does_not_stop_the_others(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    own = fake.add_service(ENV, PROJECT, "dynabase")
    assert engine.railway is not None
    engine.railway.own = OwnService(ENV, own.id)
    tenants = [railway_tenant(unique("rw"), "PRO", service="nope"),
               railway_tenant(unique("rw"), "PRO", service="dynabase"),
               railway_tenant(unique("rw"), "STARTER", service="app")]
    result = await engine.reconcile_all(POLICIES, tenants)
    by_service = {t.tenant.spec.railway.service_name: outcome(t) for t in result.tenants}  # type: ignore[union-attr]
    assert by_service["nope"].reason == "ServiceNotFound"
    assert "fix spec.railway.serviceName" in by_service["nope"].message
    assert by_service["dynabase"].reason == "OwnService"
    assert by_service["app"].ok and fake.service(ENV, "app").limits == {"vCPUs": 1.0, "memoryGB": 1.0}
    assert own.deployments == 0 and own.variables == {}
    assert all(outcome(t, "PostgresReady").ok for t in result.tenants)


async def test_a_429_during_a_pass_is_waited_out_and_the_pass_converges(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    fake.fail_next(429, retry_after=0.1)
    fake.fail_next(500)
    result = await engine.reconcile_all(POLICIES, [railway_tenant(unique("rw"), "STARTER")])
    assert outcome(result.tenants[0]).ok
    assert fake.service(ENV, "app").limits == {"vCPUs": 1.0, "memoryGB": 1.0}


async def test_a_failed_deploy_is_owed_and_done_on_the_next_pass(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    assert engine.railway is not None
    engine.railway.client.attempts = 1
    tenant = railway_tenant(unique("rw"), "PRO")
    await engine.reconcile_all(POLICIES, [tenant])
    service = fake.service(ENV, "app")
    service.sleep_application = True  # drift, and the deploy after its fix will fail
    deployments = service.deployments
    # EnvironmentState, ServiceLimits, ServiceInstanceUpdate succeed; ServiceDeploy gets a 502.
    fake.fail_next(502, operation="ServiceDeploy")
    first = await engine.reconcile_all(POLICIES, [tenant])
    assert outcome(first.tenants[0]).reason == "ApplyFailed"
    assert service.deployments == deployments and service.sleep_application is False
    fake.reset_counts()
    second = await engine.reconcile_all(POLICIES, [tenant])
    assert outcome(second.tenants[0]).ok and fake.mutation_names == ["ServiceDeploy"]
    assert service.deployments == deployments + 1


async def test_the_platform_proxy_service_is_scaled(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway,
) -> None:
    engine, _ = railway_engine
    proxy = fake.add_service(ENV, PROJECT, "proxy")
    engine.railway_platform = [ServiceTarget("platform/proxy", ServiceRef(PROJECT, ENV, "proxy"), 3, False)]
    await engine.reconcile_all(POLICIES, [], complete=True)
    assert proxy.replicas == 3 and proxy.deployments == 1
    fake.reset_counts()
    await engine.reconcile_all(POLICIES, [], complete=True)
    assert fake.mutations == [] and dict(fake.requests) == {"EnvironmentState": 1}


# -- headless mode and settings ---------------------------------------------------


async def test_headless_applies_a_merged_tier_change_to_railway_in_one_pass(
    railway_engine: tuple[Engine, MemorySecretStore], fake: FakeRailway, tmp_path: Path,
) -> None:
    from dynabase.headless.reconciler import HeadlessReconciler
    from dynabase.headless.source import DirectorySource

    engine, _ = railway_engine
    (tmp_path / "tierpolicy.yaml").write_text((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    db = unique("hlrw")
    manifest = (f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata:\n  name: {db.replace('_', '-')}\n"
                f"  namespace: gitops\nspec:\n  orgId: org-x\n  tier: {{tier}}\n  databaseName: {db}\n"
                f"  railway:\n    projectId: {PROJECT}\n    environmentId: {ENV}\n    serviceName: app\n")
    (tmp_path / "tenant.yaml").write_text(manifest.format(tier="STARTER"))
    headless = HeadlessReconciler(engine, DirectorySource(tmp_path))
    await headless.run_once()
    service = fake.service(ENV, "app")
    assert (service.replicas, service.sleep_application) == (1, True)
    (tmp_path / "tenant.yaml").write_text(manifest.format(tier="PRO"))  # the pull request is merged
    fake.reset_counts()
    await headless.run_once()
    assert (service.replicas, service.sleep_application, service.limits) == (2, False, {"vCPUs": 2.0, "memoryGB": 4.0})
    assert fake.mutation_names == ["ServiceInstanceUpdate", "ServiceLimitsUpdate", "VariablesUpsert", "ServiceDeploy"]
    assert headless.status()["tenants"][f"gitops/{db.replace('_', '-')}"]["ready"]


def test_railway_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dynabase.engine.runtime import RailwaySettings, SettingsError

    for name in ("DYNABASE_RAILWAY_TOKEN", "DYNABASE_RAILWAY_PROJECT_TOKEN", "DYNABASE_RAILWAY_PROXY_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    assert RailwaySettings.from_env() is None
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    monkeypatch.setenv("DYNABASE_RAILWAY_PROJECT_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("DYNABASE_RAILWAY_PROXY_SERVICE", "p/e/proxy")
    settings = RailwaySettings.from_env()
    assert settings is not None and settings.token == "file-token" and settings.token_kind == "project"
    assert "file-token" not in repr(settings)
    assert [t.replicas for t in settings.platform_targets()] == [2]
    monkeypatch.setenv("DYNABASE_RAILWAY_TOKEN", "account-token")
    with pytest.raises(SettingsError, match="not both"):
        RailwaySettings.from_env()
    monkeypatch.delenv("DYNABASE_RAILWAY_TOKEN")
    monkeypatch.setenv("DYNABASE_RAILWAY_PROXY_SERVICE", "just-a-name")
    with pytest.raises(SettingsError, match="projectId/environmentId/serviceName"):
        RailwaySettings.from_env()
