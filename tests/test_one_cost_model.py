"""One cost model: with a stored, non-default model and a tenant factor, the engine's judgment,
the usage report and the billing close give the same vCPU-hours and the same overage."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.cli import main
from dynabase.desired.charges import month_bounds
from dynabase.desired.cost import CostModel
from dynabase.engine.runtime import EngineSettings, close_engine, start_engine
from dynabase.spec import TenantDatabase
from dynabase.usage.month import load_declared

from .billing_helpers import (  # noqa: F401
    Month,
    Tenant,
    close_cli,
    dsn_fixture,
    month_of_fixture,
    stripe_fixture,
    stripe_mock_fixture,
)
from .stripe_helpers import StripeRecorder

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



def test_write_model_imports_a_file_then_calibrates_without_repricing_the_month(
        month_of: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    month = month_of("2002-10", [Tenant("w", "PRO", [(3, "PRO", 36_000.0, 0)])])
    month.seed(store_model=False)
    (tmp_path / "model.json").write_text(json.dumps({"cpuPerQuerySecond": 0.5, "tenantFactors": {"bill/w": 2.0}}))
    # The month's CPU: 0.5 x 36,000 s x 2 = 10 vCPU-hours estimated; the bill says 12.
    (tmp_path / "bill.json").write_text(json.dumps({"2002-10": {"cpuVcpuSeconds": 12 * 3600, "memoryGbSeconds": 0,
                                                                "costUSD": 30}}))
    monkeypatch.setenv("DYNABASE_POSTGRES_DSN", month.dsn)
    monkeypatch.setenv("DYNABASE_REDIS_URL", month.redis_url)
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)

    def report(*extra: str) -> tuple[dict[str, Any], str]:
        assert main(["usage", "report", "--month", "2002-10", "--manifests", str(month.manifests), "--format",
                     "json", *extra]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    imported, err = report("--model", str(tmp_path / "model.json"), "--write-model")
    assert imported["model"] == {"version": 0, "source": f"file {tmp_path / 'model.json'}"}
    assert "wrote cost model version 1" in err and imported["rows"][0]["vcpu_hours"] == 10.0
    calibrated, err = report("--model", str(tmp_path / "model.json"), "--bill", str(tmp_path / "bill.json"),
                             "--write-model")
    assert calibrated["calibration"]["factor"] == 1.2 and "wrote cost model version 2" in err
    assert calibrated["rows"][0]["vcpu_hours"] == 10.0  # billed as judged; calibrated 12 is the bill's view
    assert calibrated["rows"][0]["vcpu_hours_calibrated"] == 12.0

    async def stored() -> tuple[Any, Any]:
        pool = await asyncpg.create_pool(month.dsn, min_size=1, max_size=1)
        try:
            models = PostgresCostModels(pool)
            return await models.current(), await models.in_force(month_bounds("2002-10")[1])
        finally:
            await pool.close()

    newest, for_the_month = asyncio.run(stored())
    assert newest.version == 2 and newest.model.cpu_per_query_second == pytest.approx(0.6)
    assert dict(newest.tenant_factors) == {"bill/w": 2.0} and "calibrated to the 2002-10 bill" in newest.source
    # Written now: in force from now on, never for the month it was calibrated on.
    assert for_the_month.version == 0
    without_file, _ = report()
    assert without_file["model"]["version"] == 0 and without_file["rows"][0]["vcpu_hours"] == pytest.approx(
        round(0.42 * 36_000 / 3600, 4))
    assert main(["usage", "report", "--month", "2002-10", "--manifests", str(month.manifests), "--write-model"]) == 1
    assert "--write-model needs --model FILE (an import) or a bill" in capsys.readouterr().err
