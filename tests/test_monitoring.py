"""manifests/monitoring against what the servers really expose: every metric and label that a
dashboard panel, template variable or alert refers to must be in a real /metrics scrape.

One module-scoped scenario drives the real code paths on the devstack (headless passes with
errors, drift, Cold and wake, a downgrade that drains the proxy, throttled and rejected queries,
Railway requests against the fake Railway, a forged Stripe delivery), then scrapes the headless
HTTP app's /metrics, the proxy's metrics port, and the textfile `dynabase usage report` writes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.railway import OwnService, RailwayAuth, RailwayBackend, RailwayClient
from dynabase.backends.redis_acl import RedisBackend
from dynabase.billing.config import BillingConfig, WebhookSecret
from dynabase.billing.ledger import FileLedger
from dynabase.billing.processor import WebhookProcessor
from dynabase.billing.server import WEBHOOK_PATH, webhook_app
from dynabase.billing.sinks import GitTierSink
from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.desired.redis import acl_username, key_prefix
from dynabase.desired.sql import quote_ident
from dynabase.devstack.stack import free_port
from dynabase.engine import metrics as engine_metrics
from dynabase.headless import http as headless_http
from dynabase.headless.reconciler import HeadlessReconciler
from dynabase.headless.source import DirectorySource
from dynabase.keyspace import usage_field, usage_key
from dynabase.proxy.main import ProxySettings, serve
from dynabase.proxy.server import Proxy
from dynabase.usage import metrics as usage_metrics
from dynabase.usage.report import run_report

from .conftest import ROOT, Stack
from .engine_helpers import FakeClock, example_policy, make_engine, make_tenant, unique
from .events import WAIT_SECONDS, activity_recorded, ended, idle_in_postgres, key_writes, terminations
from .railway.fake import FakeRailway

MONITORING = ROOT / "manifests" / "monitoring"

# The tenant whose month's usage (one query through the proxy) is over its tiny allowance.
OVER_ALLOWANCE = "mon/ovr"
# Added by Prometheus to every series of a scrape, never in the exposition itself.
TARGET_LABELS = {"instance", "job"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${tenant}": ".*",
                     "$tenant": ".*", "${tier}": ".*", "$tier": ".*"}

POLICY = """\
apiVersion: dynabase.io/v1alpha1
kind: TierPolicy
metadata: {name: monitoring}
spec:
  warmPool: {size: 1}
  tiers:
    NAP:
      rank: 0
      postgres: {connectionLimit: 5}
      pgbouncer: {poolSize: 2}
      proxy: {maxConnections: 2, qps: 5, burst: 5, overLimit: reject, queueTimeout: 1s}
      lifecycle: {idleTimeout: 1s}
      railway: {replicas: 1, sleepApplication: true, vCPUs: 0.5, memoryGB: 0.5}
    THR:
      rank: 1
      postgres: {connectionLimit: 10}
      pgbouncer: {poolSize: 3}
      proxy: {maxConnections: 10, qps: 5, burst: 5, overLimit: throttle, queueTimeout: 5s}
    BIG:
      rank: 2
      postgres: {connectionLimit: 20}
      pgbouncer: {poolSize: 4, poolMode: session}
      proxy: {maxConnections: 6}
      lifecycle: {downgradeGracePeriod: 10m}
    OVR:
      rank: 3
      proxy: {qps: 50}
      billing: {includedVcpuHours: 0.000001, softOveragePeriod: 1m, restrictedQps: 2}
    QUO:
      rank: 4
      redis: {maxKeys: 1}
"""


def tenant_yaml(name: str, db: str, tier: str, railway_service: str | None = None) -> str:
    railway = (f"  railway: {{projectId: proj-1, environmentId: env-prod, serviceName: {railway_service}}}\n"
               if railway_service else "")
    return (f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata: {{name: {name}, namespace: mon}}\n"
            f"spec:\n  orgId: org-{name}\n  tier: {tier}\n  tierPolicyRef: monitoring\n  databaseName: {db}\n"
            + railway)


# --- the exposition -----------------------------------------------------------------------------


Sample = tuple[str, frozenset[tuple[str, str]]]  # series name and labels


def samples(registry: CollectorRegistry) -> dict[Sample, float]:
    return {(s.name, frozenset(s.labels.items())): s.value for family in registry.collect() for s in family.samples}


@dataclass
class Exposition:
    """Series names (as Prometheus stores them) with the label names seen on their samples, and
    which samples the scenario produced: the registries are the test process's, so samples other
    tests left there are told apart by their values before the scenario began."""

    before: dict[Sample, float] = field(default_factory=dict)
    series: dict[str, set[str]] = field(default_factory=dict)
    declared_only: set[str] = field(default_factory=set)
    produced: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # series -> labels of changed samples
    values: dict[Sample, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def add_text(self, text: str, registry: CollectorRegistry = REGISTRY) -> None:
        for family in text_string_to_metric_families(text):
            if not family.samples:
                self._add_declared(family.name, family.type, registry)
            for sample in family.samples:
                self.series.setdefault(sample.name, set()).update(sample.labels)
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value
                if self.before.get((sample.name, frozenset(sample.labels.items()))) != sample.value:
                    self.produced.setdefault(sample.name, []).append(sample.labels)

    def _add_declared(self, name: str, kind: str, registry: CollectorRegistry) -> None:
        """A labelled metric without children: scraped as HELP/TYPE only. Its series' names follow
        from its type and its labels from its declaration."""
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                    "gauge": [""], "summary": ["_count", "_sum", "_created"]}[kind]
        collector = registry._names_to_collectors.get(name + suffixes[0]) or registry._names_to_collectors[name]
        labels = set(collector._labelnames)
        self.declared_only.add(name)
        for suffix in suffixes:
            self.series.setdefault(name + suffix, set()).update(labels | ({"le"} if suffix == "_bucket" else set()))


# --- a small PromQL reader ----------------------------------------------------------------------

TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],])
  | (?P<space>\s+)
""", re.VERBOSE)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "inf", "nan", "atan2"}
GROUPING = {"by", "without"}
MATCHING = {"on", "ignoring", "group_left", "group_right"}


@dataclass
class Reference:
    metric: str
    labels: set[str] = field(default_factory=set)


def render(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise ValueError(f"unrendered variable in {expr!r}")
    return expr


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match.group()))
    return tokens


def closing(tokens: list[tuple[str, str]], start: int) -> int:
    """Index of the bracket closing the one at start."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opening, depth = tokens[start][1], 0
    for index in range(start, len(tokens)):
        if tokens[index][1] == opening:
            depth += 1
        elif tokens[index][1] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError("unbalanced brackets")


def references(expr: str) -> list[Reference]:
    """Metric selectors in a PromQL expression with the label names each must carry: those of its
    own matchers, and those of every by/without clause of an aggregation around it."""
    tokens = tokenize(render(expr))
    found: dict[int, Reference] = {}
    skip: set[int] = set()
    grouping: list[tuple[set[str], int, int]] = []  # labels, argument span
    for index, (kind, text) in enumerate(tokens):
        if index in skip or kind != "ident":
            continue
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text in GROUPING | MATCHING:
            if following != "(":
                continue
            end = closing(tokens, index + 1)
            labels = {t for k, t in tokens[index + 2:end] if k == "ident"}
            skip.update(range(index + 1, end + 1))
            if text in GROUPING:
                if end + 1 < len(tokens) and tokens[end + 1][1] == "(":  # sum by (x) (argument)
                    span = (end + 1, closing(tokens, end + 1))
                else:  # sum (argument) by (x)
                    depth, begin = 0, index - 1
                    for begin in range(index - 1, -1, -1):
                        depth += {")": 1, "(": -1}.get(tokens[begin][1], 0)
                        if depth == 0:
                            break
                    span = (begin, index - 1)
                grouping.append((labels, *span))
            continue
        if text in KEYWORDS or following == "(" or following in GROUPING:
            continue  # a keyword, or a function / aggregation (`sum by (x) (...)`)
        reference = Reference(text)
        if following == "{":
            end = closing(tokens, index + 1)
            for at in range(index + 2, end):
                if tokens[at][0] == "ident" and tokens[at + 1][1] in ("=", "!=", "=~", "!~"):
                    reference.labels.add(tokens[at][1])
            skip.update(range(index + 1, end + 1))
        found[index] = reference
    for labels, begin, end in grouping:
        for index, reference in found.items():
            if begin <= index <= end:
                reference.labels |= labels
    return list(found.values())


def problems(expr: str, exposition: Exposition) -> list[str]:
    out = []
    for reference in references(expr):
        labels = exposition.series.get(reference.metric)
        if labels is None:
            out.append(f"{reference.metric}: no such series in the scrape")
            continue
        missing = reference.labels - labels - TARGET_LABELS
        if missing:
            out.append(f"{reference.metric}: no label {sorted(missing)} (has {sorted(labels)})")
    return out


def label_values_problems(query: str, exposition: Exposition) -> list[str]:
    match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", query.strip())
    assert match, query
    selector, label = match.groups()
    out = problems(selector, exposition)
    for reference in references(selector):
        if label not in exposition.series.get(reference.metric, set()):
            out.append(f"{reference.metric}: no label {label!r} for the variable")
    return out


def dashboard() -> dict[str, Any]:
    return dict(json.loads((MONITORING / "dashboard.json").read_text()))


def dashboard_queries() -> list[tuple[str, str]]:
    return [(f"panel {panel['title']!r} {target['refId']}", target["expr"])
            for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    rule = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


# --- the scenario -------------------------------------------------------------------------------


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.text()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def exposition(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Exposition]:
    tmp = tmp_path_factory.mktemp("monitoring")
    railway = FakeRailway("tok-monitoring")
    await railway.start()
    railway.add_service("env-prod", "proj-1", "app")
    clock = FakeClock()
    clock.now = dt.datetime.now(dt.UTC)
    engine, secrets, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"], clock)
    engine.pgbouncer = PgBouncerBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.proxy = ProxyBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.redis = RedisBackend(stack.env["DYNABASE_REDIS_URL"])
    engine.railway = RailwayBackend(RailwayClient(RailwayAuth(railway.token, "account"), url=railway.url),
                                    own=OwnService(None, None))
    folder = tmp / "repo"
    folder.mkdir()
    (folder / "tierpolicy.yaml").write_text(POLICY)
    s = uuid.uuid4().hex[:6]
    dbs = {name: f"mon_{name}_{s}" for name in ("nap", "thr", "big", "rw", "ovr", "quo")}
    (folder / "nap.yaml").write_text(tenant_yaml("nap", dbs["nap"], "NAP"))
    (folder / "thr.yaml").write_text(tenant_yaml("thr", dbs["thr"], "THR"))
    (folder / "big.yaml").write_text(tenant_yaml("big", dbs["big"], "BIG"))
    (folder / "rw.yaml").write_text(tenant_yaml("rw", dbs["rw"], "NAP", railway_service="nope"))
    (folder / "ovr.yaml").write_text(tenant_yaml("ovr", dbs["ovr"], "OVR"))
    (folder / "quo.yaml").write_text(tenant_yaml("quo", dbs["quo"], "QUO"))
    headless = HeadlessReconciler(engine, DirectorySource(folder), clock=clock)
    stop, ready = asyncio.Event(), asyncio.Event()
    proxy_port, metrics_port, http_port = free_port(), free_port(), free_port()
    settings = ProxySettings("127.0.0.1", proxy_port, "127.0.0.1", stack.env["DYNABASE_REDIS_URL"], None,
                             f"monitoring-{s}", metrics_port)
    proxy_task: asyncio.Task[Any] | None = None
    runner = None
    found = Exposition(before={**samples(REGISTRY), **samples(usage_metrics.REGISTRY)})
    started: list[Proxy] = []
    redis_url = stack.env["DYNABASE_REDIS_URL"]

    async def metered(tenant: str) -> bool:
        """The proxy's usage flush of this hour holds query time of the tenant."""
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            text = await client.hget(usage_key(int(time.time()) // 3600),
                                     usage_field(tenant, settings.replica_id))
        finally:
            await client.aclose()
        return text is not None and float(json.loads(text).get("query_seconds", 0)) > 0

    async def serving(name: str, check: Callable[[ProxyTenantLimits], bool] = lambda _: True) -> None:
        await asyncio.wait_for(started[0].serves(dbs[name], check), WAIT_SECONDS)

    async def proxied(name: str) -> asyncpg.Connection:
        db = dbs[name]
        return await asyncpg.connect(host="127.0.0.1", port=proxy_port, user=db, database=db, ssl=False,
                                     password=secrets.passwords[f"mon/{name}"], statement_cache_size=0)

    try:
        railway.fail_next(429, retry_after=0.1)
        await headless.run_once()  # tenants, a Railway 429 then ok, a missing Railway service
        await engine.warm_pool.until_full()  # the policy's pool database made: its gauge has a sample
        quo = aioredis.Redis.from_url(redis_url, username=acl_username(dbs["quo"]),
                                      password=secrets.passwords["mon/quo"], decode_responses=True)
        try:
            await quo.set(key_prefix(dbs["quo"]) + "a", "1")
            await quo.set(key_prefix(dbs["quo"]) + "b", "2")  # over its tier's one key
        finally:
            await quo.aclose()
        admin = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"])
        try:
            await admin.execute(f"ALTER ROLE {quote_ident(dbs['thr'])} CONNECTION LIMIT 99")
        finally:
            await admin.close()
        await headless.run_once()  # a drift correction on postgres; quo over its Redis quota

        proxy_task = asyncio.create_task(serve(settings, stop, ready, on_start=started.append))
        await asyncio.wait_for(ready.wait(), 10)
        for name in ("thr", "nap", "big", "ovr"):
            await serving(name)
        async with activity_recorded(redis_url, dbs["nap"], dbs["ovr"]) as recorded:
            thr = await proxied("thr")
            for _ in range(12):
                await thr.execute("SELECT 1")  # over 5/s: throttled
            await thr.close()
            naps = [await proxied("nap"), await proxied("nap")]
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await proxied("nap")
            refused = []
            for _ in range(12):
                try:
                    await naps[0].execute("SELECT 1")
                except asyncpg.PostgresError as exc:
                    refused.append(exc.sqlstate)
            assert refused and set(refused) == {"53400"}  # over 5/s with overLimit: reject
            await asyncio.gather(*(c.close() for c in naps))
            ovr = await proxied("ovr")
            await ovr.execute("SELECT pg_sleep(0.05)")  # more than its tiny month's allowance
            await ovr.close()
        async with key_writes(redis_url, usage_key(int(time.time()) // 3600)) as usage_hash:
            await usage_hash.until(lambda: metered(OVER_ALLOWANCE), f"the usage of {OVER_ALLOWANCE}")

        await idle_in_postgres(stack.env["DYNABASE_POSTGRES_DSN"], dbs["nap"], 1.0)
        clock.now = dt.datetime.fromtimestamp(recorded[dbs["nap"]], dt.UTC) + dt.timedelta(seconds=1.5)
        await headless.run_once()  # nap goes Cold, its sessions ended; ovr over its included usage
        await serving("nap", lambda limits: limits.cold)
        woken = await proxied("nap")  # a cold start
        await woken.close()
        clock.now = dt.datetime.now(dt.UTC)
        await headless.run_once()  # nap woke

        bigs = [await proxied("big") for _ in range(4)]
        drained = terminations(bigs)
        (folder / "big.yaml").write_text(tenant_yaml("big", dbs["big"], "NAP"))
        await headless.run_once()  # a pending downgrade
        clock.advance(minutes=11)
        await headless.run_once()  # applied: the proxy drains big's connections over NAP's cap of 2;
        await ended(drained, 2)     # and ovr, over for longer than its soft period, is restricted
        await asyncio.gather(*(c.close() for c in bigs), return_exceptions=True)

        config = BillingConfig.model_validate({"prices": {"price_pro": "BIG"}, "fallbackTier": "NAP"})
        sink = GitTierSink("file:///nonexistent", "main", "", tmp / "git")
        app = webhook_app(WebhookProcessor(config, FileLedger(tmp / "ledger.json"), sink),
                          WebhookSecret("whsec_monitoring"))
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            forged = await client.post(WEBHOOK_PATH, data=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
            assert forged.status == 400
        finally:
            await client.close()

        runner = await headless_http.serve(headless, "127.0.0.1", http_port)
        found.add_text(await scrape(f"http://127.0.0.1:{http_port}/metrics"))
        found.add_text(await scrape(f"http://127.0.0.1:{metrics_port}/metrics"))
        textfile = tmp / "usage.prom"
        # What `dynabase usage report --metrics-file` leaves for node-exporter, on this month's usage.
        await run_report(f"{dt.datetime.now(dt.UTC):%Y-%m}", [str(folder)], output_format="json", bill_path=None,
                         model_path=None, metrics_file=textfile, mongo_url=None, redis_url=redis_url)
        found.add_text(textfile.read_text(), usage_metrics.REGISTRY)
        yield found
    finally:
        if runner is not None:
            await runner.cleanup()
        stop.set()
        if proxy_task is not None:
            await asyncio.wait_for(proxy_task, 10)
        await engine.warm_pool.close()
        await engine.railway.close()
        await engine.postgres.close()
        await engine.pgbouncer.close()
        await engine.proxy.close()
        await engine.redis.close()
        await railway.stop()


# --- the checks ---------------------------------------------------------------------------------


def test_the_reader_finds_metrics_labels_and_grouping() -> None:
    refs = references('histogram_quantile(0.99, sum by (le, mode) (rate(a_bucket{mode!="x"}[$__rate_interval])))'
                      ' / on () group_left sum(b_total{tenant=~"$tenant"}) by (tier) > 0.5')
    assert [(r.metric, r.labels) for r in refs] == [("a_bucket", {"le", "mode"}), ("b_total", {"tenant", "tier"})]
    assert references("count(dynabase_usage_restricted == 1) or vector(0)")[0].metric == "dynabase_usage_restricted"
    with pytest.raises(ValueError, match="unrendered"):
        render("rate(x[$unknown])")


def test_the_checker_reports_wrong_names_and_labels(exposition: Exposition) -> None:
    assert problems("sum(rate(dynabase_no_such_metric[5m]))", exposition) == [
        "dynabase_no_such_metric: no such series in the scrape"]
    assert problems("sum by (tenant) (dynabase_tenants)", exposition)[0].startswith("dynabase_tenants: no label")
    assert problems('dynabase_proxy_queries{tenant="x"}', exposition)  # a counter is stored as ..._total
    assert problems("rate(dynabase_proxy_queries_total[1m])", exposition) == []


def test_the_scenario_produced_samples_for_every_labelled_metric(exposition: Exposition) -> None:
    assert exposition.declared_only == set()  # no labelled metric is known from its declaration alone
    for series in ("dynabase_backend_errors_total", "dynabase_drift_corrections_total",
                   "dynabase_cold_transitions_total", "dynabase_sessions_ended_total",
                   "dynabase_proxy_drained_connections_total", "dynabase_railway_requests_total",
                   "dynabase_stripe_events_total", "dynabase_proxy_throttled_total",
                   "dynabase_proxy_rejected_total", "dynabase_usage_threshold_events_total",
                   "dynabase_tenant_tier_changes_total", "dynabase_proxy_limit_hits_total",
                   "dynabase_limit_hits_total", "dynabase_tenant_tier", "dynabase_tenant_ready_timestamp_seconds"):
        assert exposition.produced.get(series), f"the scenario changed no sample of {series}"
    for series in ("dynabase_usage_restricted", "dynabase_usage_month_ratio", "dynabase_usage_included_ratio",
                   "dynabase_usage_warnings_total"):
        assert OVER_ALLOWANCE in [labels.get("tenant") for labels in exposition.produced.get(series, [])], series


def test_tier_and_limit_metrics_count_what_the_scenario_did(exposition: Exposition) -> None:
    # big was demoted BIG -> NAP once: its tier gauge moved to NAP's rank, the change counted once.
    assert exposition.value("dynabase_tenant_tier", tenant="mon/big", tier="NAP") == 0
    assert exposition.value("dynabase_tenant_tier", tenant="mon/big", tier="BIG") is None
    assert exposition.value("dynabase_tenant_tier", tenant="mon/ovr", tier="OVR") == 3
    assert exposition.value("dynabase_tenant_tier_changes_total", tenant="mon/big", direction="demotion") == 1
    assert exposition.value("dynabase_tenant_tier_changes_total", tenant="mon/thr", direction="demotion") == 0
    # Limit hits at the proxy (nap: its 3rd connection and 53400s; thr: throttled) and in the engine.
    hits = "dynabase_proxy_limit_hits_total"
    assert exposition.value(hits, tenant="mon/nap", tier="NAP", kind="connections") == 1
    assert (exposition.value(hits, tenant="mon/nap", tier="NAP", kind="qps") or 0) >= 1
    assert (exposition.value(hits, tenant="mon/thr", tier="THR", kind="qps") or 0) >= 1
    assert exposition.value(hits, tenant="mon/thr", tier="THR", kind="statement_timeout") == 0
    assert exposition.value("dynabase_limit_hits_total", tenant="mon/quo", kind="redis_quota") == 1
    ready = exposition.value("dynabase_tenant_ready_timestamp_seconds", tenant="mon/thr")
    assert ready is not None and 0 < time.time() - ready < 3600  # Ready since this scenario's first pass
    assert exposition.value("dynabase_tenant_ready_timestamp_seconds", tenant="mon/rw") is None  # never Ready


def test_per_tenant_series_move_with_the_tier_and_start_at_zero() -> None:
    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"tenant": "t/moving", **labels})

    engine_metrics.set_tier("t/moving", "FREE", 0)
    assert value("dynabase_tenant_tier_changes_total", direction="promotion") == 0  # increase() sees the first
    engine_metrics.tier_changed("t/moving", "upgrade")
    engine_metrics.set_tier("t/moving", "PRO", 2)
    assert value("dynabase_tenant_tier", tier="FREE") is None and value("dynabase_tenant_tier", tier="PRO") == 2
    assert value("dynabase_tenant_tier_changes_total", direction="promotion") == 1
    engine_metrics.set_ready_since("t/moving", 1000.0)
    engine_metrics.set_ready_since("t/moving", None)  # no longer Ready: no uptime
    assert value("dynabase_tenant_ready_timestamp_seconds") is None
    engine_metrics.forget_tenant("t/moving")


async def test_a_deleted_tenant_leaves_no_series_behind(stack: Stack) -> None:
    engine, _, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        tenant = make_tenant(unique("gone"), "STARTER")
        policies = {"default": example_policy()}
        await engine.reconcile_all(policies, [tenant])
        engine_metrics.limit_hit(tenant.key, "redis_quota")
        labels = {"tenant": tenant.key, "tier": "STARTER"}
        assert REGISTRY.get_sample_value("dynabase_tenant_tier", labels) is not None
        assert REGISTRY.get_sample_value("dynabase_tenant_ready_timestamp_seconds", {"tenant": tenant.key})
        await engine.reconcile_all(policies, [], deleted=[tenant])
        left = [s for family in REGISTRY.collect() for s in family.samples if s.labels.get("tenant") == tenant.key]
        assert left == []
    finally:
        await engine.postgres.close()


@pytest.mark.parametrize(("where", "expr"), dashboard_queries(), ids=[w for w, _ in dashboard_queries()])
def test_dashboard_query_refers_to_scraped_metrics(exposition: Exposition, where: str, expr: str) -> None:
    assert references(expr), f"{where}: no metric in {expr!r}"
    assert problems(expr, exposition) == [], where


def test_dashboard_variables_refer_to_scraped_labels(exposition: Exposition) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("tenant", "tier"):
        assert label_values_problems(render(variables[name]["query"]["query"]), exposition) == [], name


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_refers_to_scraped_metrics_and_is_complete(exposition: Exposition, rule: dict[str, Any]) -> None:
    assert problems(rule["expr"], exposition) == [], rule["alert"]
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in ("info", "warning", "critical")
    assert {"summary", "description", "runbook"} <= set(rule["annotations"])


def kustomize_build(stack: Stack) -> list[dict[str, Any]]:
    out = stack.kubectl("kustomize", str(MONITORING)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.kube
def test_kustomization_ships_the_rule_and_the_dashboard(stack: Stack) -> None:
    documents = {d["kind"]: d for d in kustomize_build(stack)}
    assert set(documents) == {"PrometheusRule", "ConfigMap"}
    configmap = documents["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["dynabase.json"]) == dashboard()
    assert documents["PrometheusRule"]["metadata"]["namespace"] == "dynabase-system"
    # The apiserver has no PrometheusRule CRD: only the ConfigMap is checked by a server-side dry run.
    stack.kubectl("apply", "-f", str(ROOT / "manifests" / "namespace.yaml"))
    result = stack.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(configmap))
    assert "configmap/dynabase-grafana-dashboard" in result.stdout
