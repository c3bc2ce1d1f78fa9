"""`dynabase billing close`: each tenant's overage of a month reaches stripe-mock exactly once,
through a counting proxy, with the ledger in the devstack's real Postgres and the usage in its
real Redis; and the engine's judgment, the usage report and the close agree on one cost model."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.billing.close import StripeSettings, idempotency_key, run_close
from dynabase.billing.close_ledger import CloseBusy, PostgresCloseLedger
from dynabase.billing.config import BillingConfig, StripeApiKey
from dynabase.billing.ledger import PostgresLedger
from dynabase.billing.processor import WebhookProcessor
from dynabase.billing.sinks import SinkOutcome, SinkResult
from dynabase.cli import main
from dynabase.desired.charges import month_bounds, month_hours
from dynabase.desired.cost import CostModel, FittedModel, UsageTotals, estimate
from dynabase.desired.sql import quote_ident
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import EngineSettings, close_engine, start_engine
from dynabase.headless.month_end import MonthEndClose
from dynabase.proxy.metering import USAGE_KEY, encode, usage_field
from dynabase.settings import PLATFORM_SCHEMA_LOCK
from dynabase.spec import TenantDatabase, TenantDatabaseStatus
from dynabase.usage.month import MonthReader, RedisRollups, load_declared

from .conftest import ROOT, Stack
from .stripe_helpers import StripeRecorder, start_stripe_mock

API_KEY = "sk_test_" + uuid.uuid4().hex
HOUR = 3600.0
# 0.5 vCPU-s per query-second and 1 ms per query: not the built-in model, so a reader of the defaults disagrees.
MODEL = CostModel(cpu_per_query_second=0.5, cpu_per_query=0.001)
POLICY = """\
apiVersion: dynabase.io/v1alpha1
kind: TierPolicy
metadata: {name: default}
spec:
  tiers:
    FREE: {rank: 0, billing: {baseFeeUSD: 0, includedVcpuHours: 2}}
    STARTER: {rank: 1, billing: {baseFeeUSD: 10, includedVcpuHours: 25, overagePerVcpuHourUSD: 0.15}}
    PRO: {rank: 2, billing: {baseFeeUSD: 50, includedVcpuHours: 200, overagePerVcpuHourUSD: 0.12}}
"""


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stripe_mock() -> Iterator[int]:
    yield from start_stripe_mock()


@pytest.fixture
def stripe(stripe_mock: int) -> Iterator[StripeRecorder]:
    recorder = StripeRecorder(stripe_mock)
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture
def dsn(stack: Stack) -> Iterator[str]:
    """A database of its own: the platform schema (ledger, models, status) starts empty."""
    admin_dsn = stack.env["DYNABASE_POSTGRES_DSN"]
    name = f"billing_{uuid.uuid4().hex[:10]}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield urllib.parse.urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# -- a month of tenants ------------------------------------------------------------------------


@dataclass
class Tenant:
    name: str
    tier: str  # declared
    # (hour of the month, tier recorded by the proxy, query seconds, queries)
    hours: list[tuple[int, str, float, float]] = field(default_factory=list)
    history: list[tuple[str | None, str, dt.datetime]] = field(default_factory=list)
    customer: str | None = None
    declared: bool = True  # False: metered, then deleted

    @property
    def key(self) -> str:
        return f"bill/{self.name}"

    @property
    def org(self) -> str:
        return f"org-{self.name}"

    def manifest(self) -> str:
        return (f"---\napiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
                f"metadata: {{name: {self.name}, namespace: bill}}\nspec: {{orgId: {self.org}, tier: {self.tier}}}\n")


@dataclass
class Month:
    name: str
    tenants: list[Tenant]
    dsn: str
    redis_url: str
    workdir: Path
    factors: dict[str, float] = field(default_factory=dict)

    @property
    def manifests(self) -> Path:
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(POLICY + "".join(t.manifest() for t in self.tenants if t.declared))
        return path

    def seed(self) -> FittedModel:
        """Usage into Redis as the proxies write it, status history, customers and the model into Postgres."""
        first = month_hours(self.name).start
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        for t in self.tenants:
            for offset, tier, seconds, queries in t.hours:
                values = {"queries": queries, "query_seconds": seconds, "connections": 1.0}
                client.hset(USAGE_KEY.format(hour=first + offset), usage_field(t.key, "r1"), encode(values, tier))
        client.close()
        return asyncio.run(self._seed_postgres())

    async def _seed_postgres(self) -> FittedModel:
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        ledger = await PostgresLedger.open(self.dsn)
        try:
            statuses = PostgresStatusStore(pool)
            for t in self.tenants:
                if t.history:
                    await statuses.save(t.key, TenantDatabaseStatus.model_validate({
                        "appliedTier": t.history[-1][1],
                        "history": [{"from": a, "to": b, "at": when.isoformat()} for a, b, when in t.history]}))
                if t.customer:
                    await ledger.record_customer(t.org, t.customer, 1)
            return await PostgresCostModels(pool).write(MODEL, self.factors, "test fit",
                                                        effective_from=month_bounds(self.name)[0])
        finally:
            await ledger.close()
            await pool.close()

    def clear_usage(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        client.delete(*[USAGE_KEY.format(hour=h) for h in month_hours(self.name)])
        client.close()

    def vcpu_hours(self, t: Tenant, model: CostModel = MODEL) -> float:
        usage = UsageTotals(sum(h[3] for h in t.hours), sum(h[2] for h in t.hours))
        return estimate(usage, model, self.factors.get(t.key, 1.0)).cpu_seconds / HOUR

    def entries(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            ledger = await PostgresCloseLedger.open(self.dsn)
            try:
                return {e.tenant: e for e in await ledger.entries(self.name)}
            finally:
                await ledger.close()
        return asyncio.run(read())


@pytest.fixture
def month_of(stack: Stack, dsn: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Month] = []

    def make(name: str, tenants: list[Tenant], factors: dict[str, float] | None = None,
             redis_db: int = 0) -> Month:
        redis_url = stack.env["DYNABASE_REDIS_URL"].rsplit("/", 1)[0] + f"/{redis_db}"
        month = Month(name, tenants, dsn, redis_url, tmp_path, factors or {})
        made.append(month)
        return month

    yield make
    for month in made:
        month.clear_usage()


def query_hours(vcpu_hours: float, queries: float = 0.0) -> float:
    """Query seconds that MODEL turns into ``vcpu_hours`` (with ``queries`` queries)."""
    return (vcpu_hours * HOUR - MODEL.cpu_per_query * queries) / MODEL.cpu_per_query_second


def close_cli(month: Month, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any], str]:
    monkeypatch.setenv("DYNABASE_STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("DYNABASE_REDIS_URL", month.redis_url)
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    code = main(["billing", "close", "--month", month.name, "--manifests", str(month.manifests), "--postgres-dsn",
                 month.dsn, "--stripe-api-base", stripe.url, "--format", "json", *extra])
    out = capsys.readouterr()
    assert API_KEY not in out.out + out.err
    return code, json.loads(out.out) if out.out.strip().startswith("{") else {}, out.err


def outcomes(doc: dict[str, Any]) -> dict[str, str]:
    return {t["tenant"]: t["outcome"] for t in doc["tenants"]}


# -- the close ----------------------------------------------------------------------------------


def test_close_sends_each_overage_once_prorated_and_a_rerun_sends_nothing(
        month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    start = month_bounds("2002-01")[0]
    upgraded_at = start + dt.timedelta(days=10)  # 240 of 744 hours on STARTER, 504 on PRO
    tenants = [
        Tenant("pro-over", "PRO", [(5, "PRO", query_hours(150), 0), (600, "PRO", query_hours(70), 0)],
               customer="cus_pro"),
        # 20 vCPU-hours while on STARTER (8.06 included there), 100 on PRO (135.48 included there).
        Tenant("moved", "PRO", [(10, "STARTER", query_hours(20), 0), (300, "PRO", query_hours(100), 0)],
               history=[(None, "STARTER", start - dt.timedelta(days=40)), ("STARTER", "PRO", upgraded_at)],
               customer="cus_moved"),
        Tenant("within", "STARTER", [(7, "STARTER", query_hours(10), 0)], customer="cus_within"),
        Tenant("free-over", "FREE", [(8, "FREE", query_hours(9), 0)]),  # FREE sells no overage
        Tenant("no-customer", "STARTER", [(9, "STARTER", query_hours(30), 0)]),
        Tenant("refused", "STARTER", [(11, "STARTER", query_hours(27), 0)], customer="cus_gone"),
        Tenant("deleted", "STARTER", [(12, "STARTER", query_hours(40), 0)], declared=False),
    ]
    month = month_of("2002-01", tenants)
    model = month.seed()
    stripe.behaviour.refuse_tenants = {"bill/refused"}

    code, first, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 1, err  # two tenants are still pending
    assert first["modelVersion"] == model.version and not first["closed"]
    assert outcomes(first) == {"bill/pro-over": "sent", "bill/moved": "sent", "bill/within": "no overage",
                               "bill/free-over": "no overage", "bill/no-customer": "pending: no Stripe customer",
                               "bill/refused": "pending: Stripe refused",
                               "bill/deleted": "not invoiced: no longer declared, no organisation"}
    assert "bill/no-customer: pending: no Stripe customer" in err and "org-no-customer" in err
    assert "bill/refused: pending: Stripe refused: HTTP 400" in err and "No such customer" in err
    assert "bill/deleted: not invoiced" in err and "invoice it by hand" in err
    items = {r.tenant: r for r in stripe.items()}
    assert sorted(items) == ["bill/moved", "bill/pro-over", "bill/refused"]
    assert first["requests"] == len(stripe.requests) == 3
    # 220 vCPU-hours on PRO: 20 over at $0.12; the move: (20 - 25 * 240/744) over at $0.15 = $1.79.
    expected = {"bill/pro-over": ("cus_pro", 240), "bill/moved": ("cus_moved", 179)}
    start_ts, end_ts = (str(int(x.timestamp())) for x in month_bounds("2002-01"))
    for tenant, (customer, cents) in expected.items():
        sent = items[tenant]
        assert (sent.form["customer"], sent.form["amount"], sent.form["currency"]) == (customer, str(cents), "usd")
        assert sent.idempotency_key == idempotency_key("2002-01", tenant) == sent.form["metadata[dynabase_close]"]
        assert (sent.form["period[start]"], sent.form["period[end]"]) == (start_ts, end_ts)
        assert sent.form["metadata[cost_model_version]"] == str(model.version)
    assert "over STARTER's 8.06 included at $0.15" in items["bill/moved"].form["description"]
    ledger = month.entries()
    assert ledger["bill/moved"].state == "sent" and ledger["bill/moved"].stripe_id.startswith("ii_")
    assert ledger["bill/refused"].state == "pending" and "No such customer" in ledger["bill/refused"].last_error
    assert ledger["bill/within"].state == "nothing" and ledger["bill/within"].amount_cents == 0

    # The org of "no-customer" subscribes; the refused customer is fixed at Stripe: only those two go.
    asyncio.run(record_customer(month.dsn, "org-no-customer", "cus_new"))
    stripe.reset()
    code, second, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and second["closed"], err
    assert sorted(r.tenant for r in stripe.items()) == ["bill/no-customer", "bill/refused"]
    assert second["requests"] == 2
    refused = next(r for r in stripe.items() if r.tenant == "bill/refused")
    assert refused.idempotency_key == items["bill/refused"].idempotency_key  # the same key on retry
    assert refused.form == items["bill/refused"].form  # and the same request
    assert next(r for r in stripe.items() if r.tenant == "bill/no-customer").form["amount"] == str(
        round((30 - 25) * 0.15 * 100))

    stripe.reset()
    code, third, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and third["closed"] and third["requests"] == 0 and stripe.requests == [], err
    assert Counter(outcomes(third).values()) == {"already sent": 4, "no overage": 2,
                                                 "not invoiced: no longer declared, no organisation": 1}
    assert month.entries()["bill/deleted"].amount_cents == 225  # (40 - 25) x $0.15, recorded for a person


async def record_customer(dsn: str, org: str, customer: str) -> None:
    ledger = await PostgresLedger.open(dsn)
    try:
        await ledger.record_customer(org, customer, 2)
    finally:
        await ledger.close()


def run_subprocess(month: Month, stripe: StripeRecorder) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
           "DYNABASE_STRIPE_API_KEY": API_KEY, "DYNABASE_REDIS_URL": month.redis_url}
    env.pop("DYNABASE_MONGO_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "billing", "close", "--month", month.name, "--manifests",
         str(month.manifests), "--postgres-dsn", month.dsn, "--stripe-api-base", stripe.url, "--format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_mid_run_the_next_run_sends_the_rest_and_reuses_the_key(
        month_of: Any, stripe: StripeRecorder) -> None:
    tenants = [Tenant(f"t{i}", "STARTER", [(i, "STARTER", query_hours(25 + i + 1), 0)], customer=f"cus_{i}")
               for i in range(6)]
    month = month_of("2002-02", tenants)
    month.seed()

    killed = run_subprocess(month, stripe)
    stripe.behaviour.victim, stripe.behaviour.kill_after_items = killed, 3
    killed.communicate(timeout=120)
    assert killed.returncode == -9  # SIGKILL, right after stripe-mock created the third item
    first_run = list(stripe.requests)
    assert [r.tenant for r in first_run] == ["bill/t0", "bill/t1", "bill/t2"]
    ledger = month.entries()
    assert [ledger[f"bill/t{i}"].state for i in range(6)] == ["sent", "sent", "pending", "pending", "pending",
                                                              "pending"]
    assert ledger["bill/t2"].attempts == 1 and ledger["bill/t2"].attempted_at is not None  # maybe sent
    assert ledger["bill/t3"].attempts == 0

    stripe.behaviour = type(stripe.behaviour)()
    resumed = run_subprocess(month, stripe)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    assert result["closed"] and result["requests"] == 4  # t2 again (same key), t3, t4, t5
    assert outcomes(result) == {"bill/t0": "already sent", "bill/t1": "already sent", "bill/t2": "sent",
                                "bill/t3": "sent", "bill/t4": "sent", "bill/t5": "sent"}

    items = stripe.items()
    per_tenant = Counter(r.tenant for r in items)
    keys = {tenant: {r.idempotency_key for r in items if r.tenant == tenant} for tenant in per_tenant}
    assert per_tenant == {"bill/t0": 1, "bill/t1": 1, "bill/t2": 2, "bill/t3": 1, "bill/t4": 1, "bill/t5": 1}
    # Every tenant reached Stripe under one key: the retried t2 is Stripe's replay of the same request.
    assert all(len(k) == 1 for k in keys.values()) and len({k for ks in keys.values() for k in ks}) == 6
    t2 = [r for r in items if r.tenant == "bill/t2"]
    assert t2[0].form == t2[1].form and t2[0].form["amount"] == str(round((3 * 0.15) * 100))

    stripe.reset()
    again = run_subprocess(month, stripe)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["requests"] == 0 and stripe.requests == [], err
    print(f"\nrequests per run: killed {len(first_run)}, resumed {result['requests']}, again 0; "
          f"per tenant {dict(per_tenant)}")


def test_an_attempt_older_than_stripes_key_window_is_looked_up_first(
        month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tenants = [Tenant("found", "STARTER", [(1, "STARTER", query_hours(30), 0)], customer="cus_found"),
               Tenant("lost", "STARTER", [(2, "STARTER", query_hours(30), 0)], customer="cus_lost")]
    month = month_of("2002-03", tenants)
    month.seed()
    code, _, err = close_cli(month, stripe, monkeypatch, capsys, "--dry-run")  # claims nothing
    assert code == 0 and month.entries() == {}, err

    async def crashed_two_days_ago() -> None:
        """Both rows claimed and attempted, never marked sent: a crash long ago."""
        from dynabase.billing.close import charge_of

        policies, declared = load_declared([str(month.manifests)])
        proxy = ProxyBackend(month.redis_url)
        pool = await asyncpg.create_pool(month.dsn, min_size=1, max_size=2)
        ledger = await PostgresCloseLedger.open(month.dsn)
        try:
            pricing = await MonthReader(RedisRollups(proxy), PostgresStatusStore(pool),
                                        PostgresCostModels(pool)).price(month.name, policies, declared)
            await ledger.claim(month.name, [charge_of(t, month.name, pricing.model.version)
                                            for t in pricing.tenants])
            for t in tenants:
                await ledger.start_attempt(month.name, t.key, t.customer or "")
            conn = await asyncpg.connect(month.dsn)
            await conn.execute("UPDATE dynabase.billing_close SET attempted_at = now() - interval '2 days'")
            await conn.close()
        finally:
            await ledger.close()
            await pool.close()
            await proxy.close()

    asyncio.run(crashed_two_days_ago())
    # Stripe lists "found"'s item (its key in the metadata); "lost" is not there and is sent again.
    stripe.behaviour.list_item_key = idempotency_key("2002-03", "bill/found")
    code, doc, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and doc["closed"], err
    assert outcomes(doc) == {"bill/found": "found at Stripe", "bill/lost": "sent"}
    methods = [(r.method, r.path, r.query.get("customer") or r.form.get("customer")) for r in stripe.requests]
    assert methods == [("GET", "/v1/invoiceitems", "cus_found"), ("GET", "/v1/invoiceitems", "cus_lost"),
                       ("POST", "/v1/invoiceitems", "cus_lost")]
    assert stripe.items()[0].idempotency_key == idempotency_key("2002-03", "bill/lost")
    assert month.entries()["bill/found"].state == "sent"


# -- one cost model -----------------------------------------------------------------------------


def test_engine_report_and_close_agree_on_one_stored_model(
        month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # heavy: 0.5 x 1.6M query-seconds + 1 ms x 300k queries = 222.3 vCPU-hours on PRO, 22.3 over;
    # factored: (75,000 + 10 s) x 1.5 = 31.25 on STARTER, 6.25 over; small: 2.8, within.
    tenants = [Tenant("heavy", "PRO", [(3, "PRO", 1_000_000.0, 200_000), (500, "PRO", 600_000.0, 100_000)],
                      customer="cus_heavy"),
               Tenant("factored", "STARTER", [(4, "STARTER", 150_000.0, 10_000)], customer="cus_factored"),
               Tenant("small", "STARTER", [(6, "STARTER", 20_000.0, 5_000)], customer="cus_small")]
    month = month_of("2002-04", tenants, factors={"bill/factored": 1.5})
    model = month.seed()
    prices = {"PRO": (200, 0.12), "STARTER": (25, 0.15)}

    # The engine's judgment, on the last hour of the month, with the model it reads from Postgres.
    policies, declared = load_declared([str(month.manifests)])
    judged = asyncio.run(engine_judgment(month, policies, declared, tmp_path))
    assert judged.pop("model version") == model.version
    # The usage report of that month, from the same Postgres.
    monkeypatch.setenv("DYNABASE_POSTGRES_DSN", month.dsn)
    monkeypatch.setenv("DYNABASE_REDIS_URL", month.redis_url)
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    assert main(["usage", "report", "--month", month.name, "--manifests", str(month.manifests), "--format",
                 "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["version"] == model.version
    rows = {row["name"]: row for row in report["rows"]}
    # The close.
    code, closed, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and closed["closed"], err
    ledger = month.entries()
    sent = {r.tenant: int(r.form["amount"]) for r in stripe.items()}

    print("\ntenant        engine vCPU-h  report vCPU-h  close vCPU-h  overage $ (report / invoice)")
    for t in tenants:
        included, price = prices[t.tier]
        engine_hours = judged[t.key]
        assert engine_hours == pytest.approx(month.vcpu_hours(t), rel=1e-9)
        assert engine_hours != pytest.approx(month.vcpu_hours(t, CostModel()), rel=1e-3)  # not the defaults
        assert rows[t.key]["vcpu_hours"] == round(engine_hours, 4)
        assert ledger[t.key].detail["vcpuHours"] == round(engine_hours, 6)
        over = max(0.0, engine_hours - included)
        assert rows[t.key]["overage_vcpu_hours"] == round(over, 4)
        assert ledger[t.key].detail["overageVcpuHours"] == round(over, 6)
        cents = round(over * price * 100)
        assert round(rows[t.key]["overage_usd"] * 100) == cents == ledger[t.key].amount_cents
        assert sent.get(t.key, 0) == cents
        print(f"{t.key:<14}{engine_hours:>13.4f}{rows[t.key]['vcpu_hours']:>15.4f}"
              f"{ledger[t.key].detail['vcpuHours']:>14.4f}   {rows[t.key]['overage_usd']:.2f} / {cents / 100:.2f}")
    assert sorted(sent) == ["bill/factored", "bill/heavy"]  # "small" stays within STARTER's 25 hours


async def engine_judgment(month: Month, policies: Any, declared: list[TenantDatabase],
                          tmp_path: Path) -> dict[str, float]:
    """vCPU-hours the engine judged each tenant by (its verdict's ratio times the included hours), and
    the version of the model it read."""
    end = month_bounds(month.name)[1]
    settings = EngineSettings(postgres_dsn=month.dsn, secrets_dir=tmp_path / "secrets", redis_url=month.redis_url,
                              read_only=True)
    engine = await start_engine(settings, clock=lambda: end - dt.timedelta(minutes=20))
    try:
        result = await engine.reconcile_all(policies, declared, dry_run=True, complete=True)
    finally:
        await close_engine(engine)
    out = {"model version": float(engine.cost_model.version)}
    for tenant in result.tenants:
        assert tenant.overage is not None and tenant.limits is not None, tenant.key
        out[tenant.key] = tenant.overage.ratio * tenant.limits.billing.included_vcpu_hours
    return out


# -- the customer mapping, the schema lock, the headless hook --------------------------------------


class AcceptingSink:
    async def apply(self, request: Any) -> SinkResult:
        return SinkResult(SinkOutcome.UNCHANGED, ("bill/x",))

    def describe(self) -> str:
        return "nowhere"

    async def close(self) -> None:
        return None


async def test_subscription_events_record_the_orgs_customer(dsn: str) -> None:
    config = BillingConfig.model_validate({"prices": {"price_pro": "PRO"}})
    ledger = await PostgresLedger.open(dsn)
    processor = WebhookProcessor(config, ledger, AcceptingSink())

    def event(customer: Any, created: int) -> dict[str, Any]:
        return {"id": f"evt_{uuid.uuid4().hex}", "type": "customer.subscription.updated", "created": created,
                "data": {"object": {"id": "sub_1", "object": "subscription", "status": "active",
                                    "customer": customer, "metadata": {"org_id": "org-a"},
                                    "items": {"data": [{"price": {"id": "price_pro", "product": "prod"}}]}}}}
    try:
        assert (await processor.handle(event("cus_old", 100))).status == 200
        assert await ledger.customers(["org-a", "org-b"]) == {"org-a": "cus_old"}
        await processor.handle(event({"id": "cus_new", "object": "customer"}, 200))  # expanded customer
        await processor.handle(event("cus_stale", 150))  # delivered late: older than the last one
        assert await ledger.customers(["org-a"]) == {"org-a": "cus_new"}
    finally:
        await ledger.close()


async def test_billing_tables_are_created_under_the_platform_schema_lock(dsn: str) -> None:
    holder = await asyncpg.connect(dsn)
    await holder.execute("SELECT pg_advisory_lock($1)", PLATFORM_SCHEMA_LOCK)
    opening = [asyncio.create_task(PostgresCloseLedger.open(dsn)), asyncio.create_task(PostgresLedger.open(dsn))]
    # Both wait for the lock (and create nothing) while another creator holds it.
    while await holder.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") < 2:
        done, _ = await asyncio.wait(opening, timeout=0.05)
        assert not done, [t.result() for t in done]
    assert await holder.fetchval("SELECT to_regclass('dynabase.billing_close')") is None
    await holder.execute("SELECT pg_advisory_unlock($1)", PLATFORM_SCHEMA_LOCK)
    opened = await asyncio.gather(*opening)
    assert await holder.fetchval("SELECT to_regclass('dynabase.billing_close') IS NOT NULL")
    assert await holder.fetchval("SELECT to_regclass('dynabase.stripe_customers') IS NOT NULL")
    for ledger in opened:
        await ledger.close()
    # Many creators on a fresh schema at once: none fails on the catalog.
    await holder.execute("DROP SCHEMA dynabase CASCADE")
    ledgers = await asyncio.gather(*(PostgresCloseLedger.open(dsn) for _ in range(6)),
                                   *(PostgresLedger.open(dsn) for _ in range(6)))
    for ledger in ledgers:
        await ledger.close()
    await holder.close()


async def test_a_second_close_of_the_same_month_waits_its_turn(dsn: str) -> None:
    first, second = await PostgresCloseLedger.open(dsn), await PostgresCloseLedger.open(dsn)
    try:
        await first.lock_month("2002-06")
        with pytest.raises(CloseBusy, match="another billing close of 2002-06 is running"):
            await second.lock_month("2002-06")
        await second.lock_month("2002-07")  # another month is another lock
        await first.unlock_month("2002-06")
        await second.lock_month("2002-06")
    finally:
        await first.close()
        await second.close()


def test_headless_closes_the_previous_month_once_after_it_ended(
        month_of: Any, stripe: StripeRecorder) -> None:
    month = month_of("2002-05", [Tenant("hl", "STARTER", [(1, "STARTER", query_hours(26), 0)], customer="cus_hl")])
    month.seed()
    policies, declared = load_declared([str(month.manifests)])
    end = month_bounds("2002-05")[1]
    now = [end + dt.timedelta(minutes=30)]
    runs: list[bool] = []

    async def scenario() -> None:
        proxy = ProxyBackend(month.redis_url)
        pool = await asyncpg.create_pool(month.dsn, min_size=1, max_size=2)
        reader = MonthReader(RedisRollups(proxy), PostgresStatusStore(pool), PostgresCostModels(pool))

        async def close(name: str, pol: Any, ten: Any) -> bool:  # what servers.py wires for headless mode
            result = await run_close(name, lambda: reader.price(name, pol, ten), month.dsn,
                                     StripeSettings(StripeApiKey(API_KEY), stripe.url), now=now[0])
            runs.append(result.closed)
            return result.closed

        hook = MonthEndClose(close, clock=lambda: now[0])
        try:
            hook.after_pass(policies, declared)  # 30 minutes after the end: its last usage may still come
            await hook.wait()
            assert runs == []
            now[0] = end + dt.timedelta(hours=2)
            hook.after_pass(policies, declared)
            hook.after_pass(policies, declared)  # a pass while the close runs starts no second one
            await hook.wait()
            assert runs == [True] and hook.closed_month == "2002-05"
            hook.after_pass(policies, declared)  # closed: not looked at again
            await hook.wait()
            assert runs == [True]
            # A restarted replica asks the ledger once: already closed, nothing sent.
            restarted = MonthEndClose(close, clock=lambda: now[0])
            restarted.after_pass(policies, declared)
            await restarted.wait()
            assert runs == [True, True]
        finally:
            await pool.close()
            await proxy.close()

    asyncio.run(scenario())
    assert [(r.tenant, r.form["amount"]) for r in stripe.items()] == [("bill/hl", "15")]


def test_close_refuses_what_it_cannot_do(month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    month = month_of("2002-08", [Tenant("x", "STARTER")])
    this_month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    month.name = this_month
    code, _, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 1 and f"month {this_month} can be closed from" in err
    month.name = "2002-08"
    monkeypatch.delenv("DYNABASE_STRIPE_API_KEY")
    assert main(["billing", "close", "--month", "2002-08", "--manifests", str(month.manifests),
                 "--postgres-dsn", month.dsn]) == 1
    assert "set DYNABASE_STRIPE_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["billing", "close", "--month", "2002-13", "--kube"])
    assert "expected YYYY-MM" in capsys.readouterr().err
    assert stripe.requests == []


# -- in a cluster: the CronJob's way -------------------------------------------------------------

BILLING_SA = "system:serviceaccount:dynabase-system:dynabase-billing"


@pytest.mark.kube
def test_cronjob_closes_from_the_clusters_declarations_and_status(
        stack: Stack, crds_applied: None, month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    stack.need("kube-apiserver")
    stack.kubectl("apply", "-k", str(ROOT / "manifests"))
    cronjob = json.loads(stack.kubectl("get", "cronjob", "dynabase-billing-close", "-n", "dynabase-system",
                                       "-o", "json").stdout)
    assert cronjob["spec"]["schedule"] == "15 1 * * *" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "billing", "close", "--kube"]
    for verb, resource, allowed in (("list", "tenantdatabases.dynabase.io", "yes"),
                                    ("get", "tierpolicies.dynabase.io", "yes"),
                                    ("patch", "tenantdatabases.dynabase.io", "no"),
                                    ("get", "secrets", "no")):
        answer = stack.kubectl("auth", "can-i", verb, resource, "--as", BILLING_SA, "-A", check=False).stdout
        assert answer.strip() == allowed, (verb, resource)

    # The month's tenants as the cluster has them: the tier history is in each object's status.
    namespace, policy = f"bill-{uuid.uuid4().hex[:6]}", f"billing-{uuid.uuid4().hex[:6]}"
    start = month_bounds("2002-09")[0]
    moved = Tenant("moved", "PRO", [(10, "STARTER", query_hours(20), 0), (300, "PRO", query_hours(100), 0)],
                   customer="cus_kube")
    month = month_of("2002-09", [moved])
    month.seed()
    stack.kubectl("create", "namespace", namespace)
    stack.kubectl("apply", "-f", "-", input=POLICY.replace("name: default", f"name: {policy}")
                  + f"---\napiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
                    f"metadata: {{name: moved, namespace: {namespace}}}\n"
                    f"spec: {{orgId: org-moved, tier: PRO, tierPolicyRef: {policy}}}\n")
    history = [{"from": "STARTER", "to": "PRO", "at": (start + dt.timedelta(days=10)).isoformat()}]
    stack.kubectl("patch", "tdb", "moved", "-n", namespace, "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"appliedTier": "PRO", "history": history}}))
    # The usage was metered under bill/moved; in the cluster the tenant is <namespace>/moved.
    client = redis.Redis.from_url(month.redis_url, decode_responses=True)
    first = month_hours("2002-09").start
    for offset, tier, seconds, queries in moved.hours:
        client.hset(USAGE_KEY.format(hour=first + offset), usage_field(f"{namespace}/moved", "r1"),
                    encode({"queries": queries, "query_seconds": seconds, "connections": 1.0}, tier))
        client.hdel(USAGE_KEY.format(hour=first + offset), usage_field(moved.key, "r1"))
    client.close()

    monkeypatch.setenv("KUBECONFIG", stack.env["KUBECONFIG"])
    monkeypatch.setenv("DYNABASE_STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("DYNABASE_REDIS_URL", month.redis_url)
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    try:
        code = main(["billing", "close", "--month", "2002-09", "--kube", "--namespace", namespace,
                     "--postgres-dsn", month.dsn, "--stripe-api-base", stripe.url, "--format", "json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert outcomes(json.loads(out.out)) == {f"{namespace}/moved": "sent"}
        # Prorated from the object's status: 240 of 720 hours on STARTER -> (20 - 25/3) over at $0.15.
        assert [(r.form["customer"], r.form["amount"]) for r in stripe.items()] == [
            ("cus_kube", str(round((20 - 25 * 240 / 720) * 0.15 * 100)))]
    finally:
        stack.kubectl("delete", "namespace", namespace, "--wait=false")
        stack.kubectl("delete", "tierpolicy", policy)


# -- headless mode, end to end --------------------------------------------------------------------


def test_headless_mode_closes_the_previous_month_after_its_first_pass(
        stack: Stack, month_of: Any, stripe: StripeRecorder, tmp_path: Path) -> None:
    from dynabase.desired.charges import previous_month

    now = dt.datetime.now(dt.UTC)
    last = previous_month(now)
    if now < month_bounds(last)[1] + dt.timedelta(hours=1, minutes=5):
        pytest.skip(f"{last} ended less than an hour ago: headless mode closes it from 01:00 UTC")
    suffix = uuid.uuid4().hex[:6]
    tenant = Tenant(f"hl-{suffix}", "STARTER", [(2, "STARTER", query_hours(27), 0)], customer="cus_headless")
    # Redis database 1: the engine's PgBouncer layout and this month's usage stay out of the devstack's own.
    month = month_of(last, [tenant], redis_db=1)
    month.seed()
    database = load_declared([str(month.manifests)])[1][0].database_name
    source = tmp_path / "gitops"
    source.mkdir()
    (source / "tenants.yaml").write_text(month.manifests.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
           "DYNABASE_POSTGRES_DSN": month.dsn, "DYNABASE_REDIS_URL": month.redis_url,
           "DYNABASE_SECRETS_STORE": "files", "DYNABASE_SECRETS_DIR": str(tmp_path / "secrets"),
           "DYNABASE_STRIPE_API_KEY": API_KEY, "DYNABASE_STRIPE_API_BASE": stripe.url, "HOME": str(tmp_path)}
    env.pop("DYNABASE_MONGO_URL", None)
    created = stripe.item_created
    headless = subprocess.Popen([sys.executable, "-m", "dynabase.cli", "headless", "--source", str(source),
                                 "--host", "127.0.0.1", "--port", str(free_port()), "--interval", "1h"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert created.wait(timeout=120), "headless mode sent nothing to Stripe"
        assert wait_closed(month) == last
    finally:
        headless.terminate()
        output, _ = headless.communicate(timeout=30)
        asyncio.run(drop_tenant(month.dsn, database))
    assert [(r.tenant, r.form["customer"], r.form["amount"]) for r in stripe.items()] == [
        (tenant.key, "cus_headless", "30")]  # (27 - 25) x $0.15
    assert API_KEY not in output


def wait_closed(month: Month) -> str:
    """The month as the ledger records it closed (the close marks it right after the last item)."""
    async def closed() -> str:
        ledger = await PostgresCloseLedger.open(month.dsn)
        try:
            while not await ledger.closed(month.name):
                await asyncio.sleep(0.05)
            return month.name
        finally:
            await ledger.close()
    return asyncio.run(asyncio.wait_for(closed(), 60))


async def drop_tenant(dsn: str, name: str) -> None:
    """What headless mode created for the tenant: its database and role."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")
    finally:
        await conn.close()
