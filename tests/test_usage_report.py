"""`dynabase usage report` on usage the way the proxy writes it into the real Redis
(and the engine copies it into FerretDB), and the /proc CPU sampler on real backends."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from dynabase.backends.mongo import MongoBackend
from dynabase.cli import main
from dynabase.desired.sql import quote_ident
from dynabase.keyspace import encode_usage as encode
from dynabase.keyspace import usage_field, usage_key
from dynabase.usage.report import month_hours
from dynabase.usage.sampler import BackendCpuSampler

from .conftest import Stack

HOUR = 3600.0
MONTH = "2001-02"  # far from the clock, so no proxy of another test writes into it

MANIFESTS = """\
apiVersion: dynabase.io/v1alpha1
kind: TierPolicy
metadata: {name: default}
spec:
  tiers:
    FREE: {rank: 0, billing: {baseFeeUSD: 0, includedVcpuHours: 1}}
    PRO: {rank: 1, billing: {baseFeeUSD: 50, includedVcpuHours: 10, overagePerVcpuHourUSD: 2}}
""" + "".join(f"""---
apiVersion: dynabase.io/v1alpha1
kind: TenantDatabase
metadata: {{name: {name}, namespace: ns}}
spec: {{orgId: org-{name}, tier: {tier}}}
""" for name, tier in (("heavy", "PRO"), ("light", "PRO"), ("free", "FREE"), ("idle", "FREE")))

# tenant -> (tier, [(replica, queries, query_seconds)] per hour written); vCPU = query seconds here.
WRITTEN = {
    "ns/heavy": ("PRO", [("r1", 200, 20_000.0), ("r2", 300, 23_200.0)]),  # 12 h
    "ns/light": ("PRO", [("r1", 100, 10_800.0)]),  # 3 h
    "ns/free": ("FREE", [("r2", 50, 18_000.0)]),  # 5 h
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "manifests.yaml").write_text(MANIFESTS)
    (tmp_path / "model.json").write_text(json.dumps({"cpuPerQuerySecond": 1.0, "cpuPerQuery": 0.0}))
    # 22 vCPU-hours billed against 20 estimated: factor 1.1; $30 of $40 is CPU, $10 split over 4 tenants.
    (tmp_path / "bill.json").write_text(json.dumps(
        {MONTH: {"cpuVcpuSeconds": 22 * HOUR, "memoryGbSeconds": 0, "costUSD": 40, "cpuCostUSD": 30}}))
    return {"manifests": tmp_path / "manifests.yaml", "model": tmp_path / "model.json",
            "bill": tmp_path / "bill.json", "metrics": tmp_path / "usage.prom"}


def hash_fields() -> dict[int, dict[str, str]]:
    """Each replica's counters spread over two hours of the month, as cumulative values per hour."""
    first = month_hours(MONTH).start
    out: dict[int, dict[str, str]] = {first + 5: {}, first + 400: {}}
    for tenant, (tier, replicas) in WRITTEN.items():
        for replica, queries, seconds in replicas:
            for hour, share in ((first + 5, 0.25), (first + 400, 0.75)):
                values = {"queries": queries * share, "query_seconds": seconds * share, "connections": 1,
                          "bytes_in": 10, "bytes_out": 10, "throttled": 0, "rejected": 0, "rejected_connections": 0}
                out[hour][usage_field(tenant, replica)] = encode(values, tier)
    return out


@pytest.fixture
def redis_usage(stack: Stack) -> Iterator[None]:
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"], decode_responses=True)
    keys = []
    for hour, fields in hash_fields().items():
        key = usage_key(hour)
        client.hset(key, mapping=fields)
        keys.append(key)
    yield
    client.delete(*keys)


def run_report(files: dict[str, Path], fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["usage", "report", "--month", MONTH, "--manifests", str(files["manifests"]), "--format", fmt,
                 "--bill", str(files["bill"]), "--model", str(files["model"]),
                 "--metrics-file", str(files["metrics"])])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


EXPECTED = {
    # Revenue from the model's vCPU-hours (what the engine judged and the invoice charges); the bill
    # calibrates (vcpu_hours_calibrated) and sets cost and margin.
    # name: vcpu_hours, vcpu_hours_calibrated, overage_vcpu_hours, overage_usd, revenue_usd, cost_usd, margin,
    #       below_target, warning
    "ns/heavy": ("12.0", "13.2", "2.0", "4.0", "54.0", "20.5", "0.6204", "!", "100"),
    "ns/light": ("3.0", "3.3", "0.0", "0.0", "50.0", "7.0", "0.86", "", ""),
    "ns/free": ("5.0", "5.5", "4.0", "0.0", "0.0", "10.0", "", "!", "100"),
    "ns/idle": ("0.0", "0.0", "0.0", "0.0", "0.0", "2.5", "", "!", ""),
    "FREE": ("5.0", "5.5", "4.0", "0.0", "0.0", "12.5", "", "!", ""),
    "PRO": ("15.0", "16.5", "2.0", "4.0", "104.0", "27.5", "0.7356", "", ""),
    "all": ("20.0", "22.0", "6.0", "4.0", "104.0", "40.0", "0.6154", "!", ""),
}
COLUMNS = ("vcpu_hours", "vcpu_hours_calibrated", "overage_vcpu_hours", "overage_usd", "revenue_usd", "cost_usd",
           "margin", "below_target",
           "warning")


def test_report_from_the_proxies_redis_hashes(stack: Stack, files: dict[str, Path], redis_usage: None,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    monkeypatch.setenv("DYNABASE_REDIS_URL", stack.env["DYNABASE_REDIS_URL"])
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(run_report(files, "csv", capsys)))}
    assert set(rows) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert tuple(rows[name][c] for c in COLUMNS) == expected, name
    assert rows["ns/heavy"]["queries"] == "500"
    assert (rows["ns/free"]["scope"], rows["FREE"]["scope"], rows["all"]["scope"]) == ("tenant", "tier", "total")
    assert rows["ns/light"]["included_vcpu_hours"] == "10.0" and rows["PRO"]["included_vcpu_hours"] == "20.0"

    metrics = files["metrics"].read_text()
    assert 'dynabase_usage_warnings_total{level="100",tenant="ns/heavy"} 1.0' in metrics
    assert 'dynabase_usage_warnings_total{level="100",tenant="ns/free"} 1.0' in metrics
    assert 'dynabase_usage_included_ratio{tenant="ns/light",tier="PRO"} 0.3' in metrics
    assert "dynabase_calibration_factor 1.1" in metrics

    table = run_report(files, "table", capsys)
    assert "calibration factor 1.100" in table and "ALERT" not in table
    assert "warning: ns/heavy (PRO) at 100% of its included vCPU-hours" in table
    heavy_line = next(line for line in table.splitlines() if "ns/heavy" in line)
    assert heavy_line.startswith("!") and "62.0%" in heavy_line


@pytest.mark.mongo
def test_report_from_mongo_tenant_usage_matches(stack: Stack, files: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stack.need("ferretdb")
    url = stack.env["DYNABASE_MONGO_URL"]

    async def copy() -> None:  # what Engine.rollup_usage does with each hour
        mongo = MongoBackend(url)
        try:
            await mongo.client["dynabase"]["tenantUsage"].delete_many({"tenant": {"$in": list(WRITTEN)}})
            for hour, fields in hash_fields().items():
                await mongo.write_usage(hour, fields)
        finally:
            await mongo.close()

    asyncio.run(copy())
    monkeypatch.setenv("DYNABASE_MONGO_URL", url)
    # An over-estimate of the bill's CPU beyond 20 % must raise the alert.
    files["bill"].write_text(json.dumps({MONTH: {"cpuVcpuSeconds": 30 * HOUR, "memoryGbSeconds": 0,
                                                 "costUSD": 40, "cpuCostUSD": 30}}))
    doc = json.loads(run_report(files, "json", capsys))
    assert doc["source"] == "mongo"
    assert doc["calibration"]["factor"] == 1.5 and doc["calibration"]["alert"] is True
    rows = {row["name"]: row for row in doc["rows"]}
    assert rows["ns/heavy"]["vcpu_hours"] == 12.0 and rows["ns/heavy"]["vcpu_hours_calibrated"] == 18.0
    assert rows["ns/heavy"]["overage_usd"] == 4.0 and rows["ns/heavy"]["revenue_usd"] == 54.0
    assert rows["ns/heavy"]["cost_usd"] == 20.5 and rows["ns/heavy"]["queries"] == 500
    assert rows["all"]["cost_usd"] == 40.0 and rows["all"]["vcpu_hours_calibrated"] == 30.0
    assert {(w["tenant"], w["level"]) for w in doc["warnings"]} == {("ns/heavy", "100"), ("ns/free", "100")}


# -- the /proc sampler -------------------------------------------------------------


BURN = "SELECT count(*) FROM generate_series(1, 3e6)"


async def test_sampler_measures_the_backend_that_burns_cpu(stack: Stack) -> None:
    dsn = stack.env["DYNABASE_POSTGRES_DSN"]
    suffix = uuid.uuid4().hex[:8]
    burn_db, idle_db, before_db = f"burn_{suffix}", f"idle_{suffix}", f"before_{suffix}"
    admin = await asyncpg.connect(dsn)
    for name in (burn_db, idle_db, before_db):
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    try:
        # A backend that burned CPU before the window opens: none of that is counted.
        before = await asyncpg.connect(dsn, database=before_db)
        await before.fetchval(BURN)
        idle = await asyncpg.connect(dsn, database=idle_db)
        sampler = BackendCpuSampler(dsn)
        await sampler.start()
        stop = asyncio.Event()
        sweeping = asyncio.create_task(sampler.run(stop, interval=0.2))
        burn = await asyncpg.connect(dsn, database=burn_db)
        for _ in range(3):
            await burn.fetchval(BURN)
        await idle.fetchval("SELECT 1")
        stop.set()
        await sweeping  # its last sweep began after the stop: the burn is all in
        await sampler.close()
        for conn in (burn, idle, before):
            await conn.close()
    finally:
        for name in (burn_db, idle_db, before_db):
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await admin.close()
    measured = sampler.seconds_by_database
    assert sampler.sweeps >= 3  # the baseline, run()'s first, and the one after the stop
    assert measured.get(burn_db, 0.0) > 0.3, measured
    assert measured.get(idle_db, 0.0) < 0.05, measured
    assert measured.get(before_db, 0.0) < 0.05, measured


@pytest.mark.kube
def test_calibration_against_railways_usage_query_raises_an_alert_and_an_event(
        stack: Stack, files: dict[str, Path], redis_usage: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from .railway.fake import FakeRailway, fake_in_thread

    stack.need("kube-apiserver")
    fake = FakeRailway("usage-token")
    # The database service billed 30 vCPU-hours (1,800 vCPU-minutes) against 20 estimated: factor 1.5.
    fake.usage_rows = [
        {"measurement": "CPU_USAGE", "value": 1200.0, "tags": {"serviceId": "svc-db", "projectId": "p1"}},
        {"measurement": "CPU_USAGE", "value": 600.0, "tags": {"serviceId": "svc-db", "projectId": "p1"}},
        {"measurement": "MEMORY_USAGE_GB", "value": 4320.0, "tags": {"serviceId": "svc-db", "projectId": "p1"}},
        {"measurement": "CPU_USAGE", "value": 99999.0, "tags": {"serviceId": "svc-other", "projectId": "p1"}},
    ]
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    monkeypatch.setenv("DYNABASE_REDIS_URL", stack.env["DYNABASE_REDIS_URL"])
    monkeypatch.setenv("DYNABASE_RAILWAY_TOKEN", fake.token)
    monkeypatch.setenv("KUBECONFIG", stack.env["KUBECONFIG"])
    with fake_in_thread(fake):
        monkeypatch.setenv("DYNABASE_RAILWAY_URL", fake.url)
        code = main(["usage", "report", "--month", MONTH, "--manifests", str(files["manifests"]), "--format", "json",
                     "--bill-railway", "p1/svc-db", "--model", str(files["model"]),
                     "--kube-event"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert fake.requests["ProjectUsage"] == 1
    assert report["calibration"]["factor"] == pytest.approx(1.5) and report["calibration"]["alert"] is True
    # Railway's published prices: 1,800 vCPU-minutes at $20/vCPU-month, 4,320 GB-minutes at $10/GB-month.
    assert report["bill"]["costUSD"] == pytest.approx(1800 * 20 / 43200 + 4320 * 10 / 43200)
    assert "calibration alert" in out.err and "usage-token" not in out.err + out.out
    events = json.loads(stack.kubectl("get", "events", "-n", "default", "-o", "json",
                                      "--field-selector", "reason=CalibrationVariance").stdout)["items"]
    assert [(e["involvedObject"]["kind"], e["involvedObject"]["name"], e["type"]) for e in events] == [
        ("TierPolicy", "default", "Warning")]
    assert "1.500" in events[0]["message"] and MONTH in events[0]["message"]
