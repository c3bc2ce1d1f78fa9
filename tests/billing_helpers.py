"""Shared by the billing tests: stripe-mock behind a counting proxy, a database of its own per test,
and a month of tenants written where the proxies, the engine and the webhooks write them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.billing.close_ledger import PostgresCloseLedger
from dynabase.billing.ledger import PostgresLedger
from dynabase.cli import main
from dynabase.desired.charges import month_bounds, month_hours
from dynabase.desired.cost import CostModel, FittedModel, UsageTotals, estimate
from dynabase.keyspace import encode_usage as encode
from dynabase.keyspace import usage_field, usage_key
from dynabase.spec import TenantDatabaseStatus

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


@pytest.fixture(name="stripe_mock", scope="module")
def stripe_mock_fixture() -> Iterator[int]:
    yield from start_stripe_mock()


@pytest.fixture(name="stripe")
def stripe_fixture(stripe_mock: int) -> Iterator[StripeRecorder]:
    recorder = StripeRecorder(stripe_mock)
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture(name="dsn")
def dsn_fixture(stack: Stack) -> Iterator[str]:
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

    def seed(self, *, store_model: bool = True) -> FittedModel:
        """Usage into Redis as the proxies write it, status history, customers and (unless told not to)
        MODEL as the stored version in force from the month's start, into Postgres."""
        first = month_hours(self.name).start
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        for t in self.tenants:
            for offset, tier, seconds, queries in t.hours:
                values = {"queries": queries, "query_seconds": seconds, "connections": 1.0}
                client.hset(usage_key(first + offset), usage_field(t.key, "r1"), encode(values, tier))
        client.close()
        return asyncio.run(self._seed_postgres(store_model))

    async def _seed_postgres(self, store_model: bool) -> FittedModel:
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
            if not store_model:
                return FittedModel()
            return await PostgresCostModels(pool).write(MODEL, self.factors, "test fit",
                                                        effective_from=month_bounds(self.name)[0])
        finally:
            await ledger.close()
            await pool.close()

    def clear_usage(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        client.delete(*[usage_key(h) for h in month_hours(self.name)])
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


@pytest.fixture(name="month_of")
def month_of_fixture(stack: Stack, dsn: str, tmp_path: Path) -> Iterator[Any]:
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
    return code, json.loads(out.out) if out.out.strip().startswith("{") else {"text": out.out}, out.err


def outcomes(doc: dict[str, Any]) -> dict[str, str]:
    return {t["tenant"]: t["outcome"] for t in doc["tenants"]}



def record_customer_now(dsn: str, org: str, customer: str) -> None:
    async def record() -> None:
        ledger = await PostgresLedger.open(dsn)
        try:
            await ledger.record_customer(org, customer, 2)
        finally:
            await ledger.close()
    asyncio.run(record())


def run_subprocess(month: Month, stripe: StripeRecorder) -> subprocess.Popen[str]:
    """The close as its own process (the CronJob's, or one killed mid-run)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
           "DYNABASE_STRIPE_API_KEY": API_KEY, "DYNABASE_REDIS_URL": month.redis_url}
    env.pop("DYNABASE_MONGO_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "billing", "close", "--month", month.name, "--manifests",
         str(month.manifests), "--postgres-dsn", month.dsn, "--stripe-api-base", stripe.url, "--format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
