"""DirectAccess: could a tenant's role log in to Postgres around the proxy?

The evaluator (``desired.pg_hba``) is checked line by line against Postgres' rule (first
matching line wins, ``reject`` refuses), then the engine reads ``pg_hba_file_rules`` of a
Postgres of its own whose pg_hba.conf the test edits and reloads, and a real login from
127.0.0.1 agrees with the verdict. The NetworkPolicies in manifests/optional admit exactly
DynaBase's pods to Postgres (checked against the manifests' pod labels and by the apiserver).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dynabase.desired.pg_hba import AllowedSources, HbaRule, PgHbaObserved, direct_access
from dynabase.engine import metrics
from dynabase.engine.conditions import Outcome, build_conditions
from dynabase.engine.reconciler import Engine
from dynabase.engine.results import TenantResult
from dynabase.engine.status import count_failures
from dynabase.engine.stores import MemorySecretStore
from dynabase.spec import TenantDatabase

from .conftest import ROOT, Stack
from .engine_helpers import example_policy, make_engine, make_tenant, unique
from .fresh_postgres import FreshPostgres, fresh_postgres

LOOPBACK = AllowedSources(local=True, networks=AllowedSources.parse("127.0.0.1/32,::1").networks)
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def rules(*lines: str) -> PgHbaObserved:
    """pg_hba.conf lines as pg_hba_file_rules shows them (a CIDR becomes address + netmask)."""
    out = []
    for number, line in enumerate(lines, start=1):
        words = line.split()
        kind, databases, users = words[0], tuple(words[1].split(",")), tuple(words[2].split(","))
        address = netmask = None
        if kind != "local":
            where = words[3]
            if "/" in where:
                net = ipaddress.ip_network(where, strict=False)
                address, netmask = str(net.network_address), str(net.netmask)
            else:
                address = where
        out.append(HbaRule(number, kind, databases, users, address, netmask, words[-1]))
    return PgHbaObserved(tuple(out))


def verdict(observed: PgHbaObserved, role: str = "acme", allowed: AllowedSources = LOOPBACK,
            database: str | None = None) -> bool | None:
    return direct_access(observed, database or role, role, allowed).open


# -- the evaluator ----------------------------------------------------------------------


def test_the_first_matching_line_decides() -> None:
    observed = rules("local all all scram-sha-256", "host all all 127.0.0.1/32 scram-sha-256",
                     "host all all 0.0.0.0/0 scram-sha-256")
    found = direct_access(observed, "acme", "acme", LOOPBACK)
    assert found.open and found.rule is not None and found.rule.line_number == 3
    assert "pg_hba.conf line 3 (host all all 0.0.0.0/0 scram-sha-256)" in found.message
    assert "addresses such as 0.0.0.0" in found.message and "DYNABASE_POSTGRES_ALLOWED_SOURCES" in found.message
    assert verdict(rules("local all all scram-sha-256", "host all all 127.0.0.1/32 md5")) is False


def test_reject_lines_before_a_wide_line_count() -> None:
    observed = rules("host acme all 0.0.0.0/0 reject", "host all all 0.0.0.0/0 scram-sha-256")
    assert verdict(observed, "acme") is False
    assert verdict(observed, "globex") is True
    # A reject of part of the space leaves the rest open; one covering it all (with the allowed part) closes it.
    assert verdict(rules("host all all 10.0.0.0/8 reject", "host all all 0.0.0.0/0 md5")) is True
    assert verdict(rules("host all all 0.0.0.0/1 reject", "host all all 128.0.0.0/1 reject",
                         "host all all 0.0.0.0/0 md5")) is False
    # "all" covers IPv6 too: a reject of all IPv4 leaves it open there.
    found = direct_access(rules("host all all 0.0.0.0/0 reject", "host all all all md5"), "acme", "acme", LOOPBACK)
    assert found.open and "addresses such as ::" in found.message


def test_lines_inside_the_allowed_sources_are_fine() -> None:
    allowed = AllowedSources.parse("local,10.0.0.0/8")
    assert verdict(rules("host all all 10.1.0.0/16 md5"), allowed=allowed) is False
    assert verdict(rules("host all all 10.0.0.0/7 md5"), allowed=allowed) is True  # 11.0.0.0/8 too
    found = direct_access(rules("host all all 10.1.2.3/32 reject", "host all all 11.0.0.7/32 md5"),
                          "acme", "acme", allowed)
    assert found.open and "from 11.0.0.7, outside" in found.message  # one address: named as it is


def test_ssl_and_gss_variants_are_judged_per_kind_of_connection() -> None:
    # Plain TCP refused, but a client asking for SSL reaches line 2.
    found = direct_access(rules("hostnossl all all 0.0.0.0/0 reject", "host all all 0.0.0.0/0 md5"),
                          "acme", "acme", LOOPBACK)
    assert found.open and "over TCP with SSL" in found.message
    closed = rules("hostssl all all 0.0.0.0/0 reject", "hostnossl all all 0.0.0.0/0 reject",
                   "host all all 0.0.0.0/0 md5")
    assert verdict(closed) is False  # plain, SSL and GSS (hostnossl matches it) all refused first
    gss = rules("hostnogssenc all all 0.0.0.0/0 reject", "hostgssenc all all 0.0.0.0/0 gss")
    assert direct_access(gss, "acme", "acme", LOOPBACK).message.count("GSS") == 1


def test_the_unix_socket_counts_only_when_it_is_not_allowed() -> None:
    socket_only = rules("local all all scram-sha-256")
    assert verdict(socket_only) is False
    tcp_only = AllowedSources.parse("10.0.0.0/8")
    assert verdict(socket_only, allowed=tcp_only) is True
    assert verdict(rules("local all all reject", "local all all trust"), allowed=tcp_only) is False


def test_database_and_user_keywords() -> None:
    assert verdict(rules("host sameuser all 0.0.0.0/0 md5")) is True  # tenant database = its role
    assert verdict(rules("host other_db all 0.0.0.0/0 md5")) is False
    assert verdict(rules("host all other_role 0.0.0.0/0 md5")) is False
    assert verdict(rules("host all acme 0.0.0.0/0 md5")) is True
    assert verdict(rules("host replication all 0.0.0.0/0 md5")) is False  # no tenant role may replicate
    grouped = rules("host all +tenants 0.0.0.0/0 md5")
    assert verdict(grouped) is False
    member = PgHbaObserved(grouped.rules, {"acme": frozenset({"tenants"})})
    assert verdict(member) is True
    assert verdict(PgHbaObserved(rules("host samerole all 0.0.0.0/0 md5").rules, {}), "acme", database="app") is False
    assert grouped.rules[0].uses_groups and not rules("host all all all md5").rules[0].uses_groups


def test_names_postgres_cannot_be_judged_on_count_as_outside() -> None:
    found = direct_access(rules("host all all .example.com md5"), "acme", "acme", LOOPBACK)
    assert found.open and "cannot be checked here" in found.message
    assert verdict(rules("host all all samenet reject", "host all all 127.0.0.1/32 md5")) is False
    broken = PgHbaObserved((HbaRule(7, "host", ("all",), ("all",), None, None, "md5",
                                    error="invalid IP address \"999.1.1.1\""),))
    unknown = direct_access(broken, "acme", "acme", LOOPBACK)
    assert unknown.open is None and "line 7 has an error" in unknown.message


def test_allowed_sources_are_read_from_the_setting() -> None:
    parsed = AllowedSources.parse(" local , 10.0.0.0/8,fd00::/8 ,192.168.1.7")
    assert parsed.local and parsed.describe() == "local, 10.0.0.0/8, fd00::/8, 192.168.1.7/32"
    assert not AllowedSources.parse("10.0.0.0/8").local
    assert AllowedSources.from_setting("off") is None
    for bad in ("", "nowhere", "10.0.0.0/33"):
        with pytest.raises(ValueError):
            AllowedSources.parse(bad)


def test_direct_access_true_is_advisory_and_reads_as_it_says() -> None:
    outcomes = [Outcome("PostgresReady", True, "Reconciled"),
                Outcome("DirectAccess", False, "OpenInPgHba", "role acme can log in around the proxy",
                        advisory=True, status="True")]
    conditions = {c.type: c for c in build_conditions(outcomes, None, 1, NOW)}
    assert conditions["DirectAccess"].status == "True" and conditions["Ready"].status == "True"
    assert "advisory: DirectAccess: OpenInPgHba" in conditions["Ready"].message
    closed = build_conditions([Outcome("DirectAccess", True, "ProxyOnly", status="False")], None, 1, NOW)
    assert [(c.type, c.status) for c in closed] == [("DirectAccess", "False"), ("Ready", "True")]


# -- against a Postgres of its own ---------------------------------------------------------

BASE_HBA = (
    "local all postgres trust\n"
    "local all all scram-sha-256\n"
    "host all postgres 127.0.0.1/32 scram-sha-256\n"  # the engine
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[FreshPostgres]:
    with fresh_postgres() as fresh:
        yield fresh


@pytest.fixture
async def engine(postgres: FreshPostgres) -> AsyncIterator[tuple[Engine, MemorySecretStore]]:
    postgres.write_hba(BASE_HBA + "host all all 127.0.0.1/32 scram-sha-256\n")
    engine, secrets, _ = await make_engine(postgres.dsn)
    engine.postgres_allowed_sources = LOOPBACK
    try:
        yield engine, secrets
    finally:
        await engine.postgres.close()


async def _direct_access(engine: Engine, *tenants: TenantDatabase) -> dict[str, tuple[str, str, str]]:
    """Each tenant's DirectAccess condition after one pass: (status, reason, message)."""
    result = await engine.reconcile_all({"default": example_policy()}, list(tenants))
    out = {}
    for tenant in result.tenants:
        assert tenant.ready, (tenant.key, tenant.outcomes)  # advisory: Ready either way
        assert tenant.status is not None
        found = tenant.status.condition("DirectAccess")
        assert found is not None, tenant.status.conditions
        out[tenant.tenant.database_name] = (found.status, found.reason, found.message)
    return out


async def test_the_engine_reads_pg_hba_and_follows_its_edits(postgres: FreshPostgres,
                                                             engine: tuple[Engine, MemorySecretStore]) -> None:
    pass_engine, _ = engine
    acme, globex = make_tenant(unique("acme"), "FREE"), make_tenant(unique("globex"), "FREE")
    first = await _direct_access(pass_engine, acme, globex)
    assert first[acme.database_name][:2] == ("False", "ProxyOnly")

    postgres.write_hba(BASE_HBA + "host all all 127.0.0.1/32 scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n")
    opened = await _direct_access(pass_engine, acme, globex)
    status, reason, message = opened[acme.database_name]
    assert (status, reason) == ("True", "OpenInPgHba")
    assert "pg_hba.conf line 5 (host all all 0.0.0.0/0 scram-sha-256)" in message and acme.database_name in message

    # A reject for one tenant's database before the wide line: that tenant only is closed again.
    postgres.write_hba(BASE_HBA + f"host all all 127.0.0.1/32 scram-sha-256\nhost {acme.database_name} all "
                       "0.0.0.0/0 reject\nhost all all 0.0.0.0/0 scram-sha-256\n")
    narrowed = await _direct_access(pass_engine, acme, globex)
    assert narrowed[acme.database_name][:2] == ("False", "ProxyOnly")
    assert narrowed[globex.database_name][:2] == ("True", "OpenInPgHba")
    assert "line 6" in narrowed[globex.database_name][2]

    # A line Postgres cannot parse: the file is not loaded, and the verdict is Unknown, not a guess.
    postgres.hba_file.write_text(BASE_HBA + "host all all 999.1.1.1/32 md5\n")
    unknown = await _direct_access(pass_engine, acme)
    assert unknown[acme.database_name][:2] == ("Unknown", "PgHbaInvalid")
    assert "line 4 has an error" in unknown[acme.database_name][2]


async def test_the_verdict_agrees_with_a_real_login(postgres: FreshPostgres,
                                                     engine: tuple[Engine, MemorySecretStore]) -> None:
    pass_engine, secrets = engine
    pass_engine.postgres_allowed_sources = AllowedSources.parse("local")  # TCP from anywhere counts
    tenant = make_tenant(unique("login"), "FREE")
    role = tenant.database_name
    postgres.write_hba(BASE_HBA + "host all all 127.0.0.1/32 scram-sha-256\n")
    verdicts = await _direct_access(pass_engine, tenant)
    assert verdicts[role][:2] == ("True", "OpenInPgHba") and "from 127.0.0.1, outside" in verdicts[role][2]
    password = secrets.passwords[tenant.key]
    host, port = postgres.dsn.rsplit("@", 1)[1].split("/", 1)[0].split(":")
    with psycopg.connect(host=host, port=port, user=role, password=password, dbname=role) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)  # the direct login Postgres allows

    postgres.write_hba(BASE_HBA + f"host all {role} 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 scram-sha-256\n")
    verdicts = await _direct_access(pass_engine, tenant)
    assert verdicts[role][:2] == ("False", "ProxyOnly")
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects connection"):
        psycopg.connect(host=host, port=port, user=role, password=password, dbname=role).close()


# -- the NetworkPolicies of manifests/optional ------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_names(manifest: Path) -> set[str]:
    """app.kubernetes.io/name of each pod template in a manifest file."""
    names = set()
    for doc in _documents(manifest):
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if template:
            names.add(template["metadata"]["labels"]["app.kubernetes.io/name"])
    return names


def test_postgres_ingress_admits_exactly_the_pods_that_need_postgres() -> None:
    [policy] = _documents(ROOT / "manifests" / "optional" / "postgres-ingress" / "networkpolicy.yaml")
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "dynabase-system"}
    [expression] = source["podSelector"]["matchExpressions"]
    admitted = set(expression["values"])
    deployed = set().union(*(_pod_names(ROOT / "manifests" / name)
                             for name in ("operator.yaml", "proxy.yaml", "billing-close.yaml")))
    # The pods of the manifests that read Postgres (the agent runs in the proxy pod), and headless
    # mode for whoever runs it in the cluster; a renamed label would silently shut one out.
    assert deployed == {"dynabase-operator", "dynabase-proxy", "dynabase-billing-close"}
    assert admitted == deployed | {"dynabase-headless"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}] and policy["spec"]["policyTypes"] == ["Ingress"]


def test_tenant_egress_allows_everything_but_postgres() -> None:
    [policy] = _documents(ROOT / "manifests" / "optional" / "tenant-egress" / "networkpolicy.yaml")
    [rule] = policy["spec"]["egress"]
    blocks = [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]
    assert {"namespaceSelector": {}} in rule["to"]  # the proxy, DNS: every pod stays reachable
    assert blocks == [{"cidr": "0.0.0.0/0", "except": ["192.0.2.10/32"]}, {"cidr": "::/0"}]
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Egress"]


@pytest.mark.kube
def test_the_network_policies_are_accepted_by_the_apiserver(stack: Stack, crds_applied: None) -> None:
    for namespace in ("databases", "tenants-egress-check"):
        if stack.kubectl("get", "namespace", namespace, check=False).returncode != 0:
            stack.kubectl("create", "namespace", namespace)
    optional = ROOT / "manifests" / "optional"
    ingress = stack.kubectl("apply", "--dry-run=server", "-k", str(optional / "postgres-ingress"))
    assert "networkpolicy.networking.k8s.io/postgres-only-from-dynabase" in ingress.stdout
    egress = stack.kubectl("apply", "--dry-run=server", "-n", "tenants-egress-check", "-k",
                           str(optional / "tenant-egress"))
    assert "networkpolicy.networking.k8s.io/no-direct-postgres" in egress.stdout


def test_an_open_pg_hba_is_not_counted_as_a_backend_error() -> None:
    def errors() -> float:
        return sum(s.value for m in metrics.BACKEND_ERRORS.collect() for s in m.samples if s.name.endswith("_total"))

    result = TenantResult(make_tenant("open_hba", "FREE"))
    result.outcomes.append(Outcome("DirectAccess", False, "OpenInPgHba", "…", advisory=True, status="True"))
    before = errors()
    count_failures([result])
    assert errors() == before  # every pass would otherwise raise the reconcile-errors alert
    result.outcomes.append(Outcome("PostgresReady", False, "ApplyFailed", "boom"))
    count_failures([result])
    assert errors() == before + 1
