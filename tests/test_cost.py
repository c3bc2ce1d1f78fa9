"""The cost model, its calibration, a month's prorated pricing and the report's arithmetic (pure functions)."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest

from dynabase.desired.charges import (
    TenantMonth,
    completed_history,
    metered_hours,
    month_bounds,
    month_hours,
    previous_month,
    price_month,
    price_tenant_month,
    tier_hours,
    usage_by_tier,
    usd_cents,
)
from dynabase.desired.cost import (
    BillMeasurement,
    CostModel,
    FittedModel,
    UsageTotals,
    calibrate,
    estimate,
    fit_cpu,
    model_document,
    model_from_document,
    tenant_factors,
    warning_level,
)
from dynabase.desired.effective import BillingEffective
from dynabase.desired.margin import build_report
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.tenant import TierChange

PRO = BillingEffective(base_fee_usd=50.0, included_vcpu_hours=10.0, overage_per_vcpu_hour_usd=2.0)
FREE = BillingEffective(base_fee_usd=0.0, included_vcpu_hours=1.0)
# One vCPU-second per query-second, nothing per query: usage in query-seconds is CPU.
UNIT = CostModel(cpu_per_query_second=1.0, cpu_per_query=0.0)
HOUR = 3600.0


def whole_month(tenant: str, tier: str, usage: UsageTotals, billing: BillingEffective) -> TenantMonth:
    """A tenant on one tier for the whole (720-hour) month, with the unit model."""
    return price_tenant_month(tenant, None, tier, {tier: 720.0}, {tier: usage}, {tier: billing}, 720.0,
                              FittedModel(UNIT))


def test_estimate_is_the_linear_model_scaled_by_the_tenant_factor() -> None:
    model = CostModel(cpu_per_query_second=0.5, cpu_per_query=0.001, memory_gb_per_query_second=0.1,
                      memory_gb_seconds_per_connection=2.0)
    got = estimate(UsageTotals(queries=1000, query_seconds=10, connections=3), model, tenant_factor=2.0)
    assert got.cpu_seconds == pytest.approx(2.0 * (0.5 * 10 + 0.001 * 1000))
    assert got.memory_gb_seconds == pytest.approx(2.0 * (0.1 * 10 + 2.0 * 3))


def test_fit_recovers_known_coefficients_from_noisy_samples() -> None:
    rng = random.Random(7)
    samples = []
    for _ in range(40):
        usage = UsageTotals(queries=rng.uniform(1e3, 1e6), query_seconds=rng.uniform(1, 500))
        cpu = 0.7 * usage.query_seconds + 0.00004 * usage.queries
        samples.append((usage, cpu * rng.uniform(0.99, 1.01)))
    model = fit_cpu(samples)
    assert model.cpu_per_query_second == pytest.approx(0.7, rel=0.02)
    assert model.cpu_per_query == pytest.approx(0.00004, rel=0.05)


def test_fit_keeps_coefficients_non_negative() -> None:
    # CPU falls as queries rise at equal query time: an unconstrained fit would price queries negatively.
    samples = [(UsageTotals(queries=100, query_seconds=10), 10.0),
               (UsageTotals(queries=10_000, query_seconds=10), 8.0),
               (UsageTotals(queries=100, query_seconds=20), 20.0)]
    model = fit_cpu(samples, relative=False)
    assert model.cpu_per_query == 0.0
    assert model.cpu_per_query_second == pytest.approx((10 * 10 + 10 * 8 + 20 * 20) / (100 + 100 + 400))


def test_relative_fit_weighs_small_tenants_like_large_ones() -> None:
    # One big tenant at 1.0 CPU per query-second, two small ones at 2.0: plain least squares
    # follows the big one, the relative fit lands between and keeps the small ones' error bounded.
    samples = [(UsageTotals(query_seconds=1000), 1000.0), (UsageTotals(query_seconds=1), 2.0),
               (UsageTotals(query_seconds=2), 4.0)]
    plain, relative = fit_cpu(samples, relative=False), fit_cpu(samples)
    assert plain.cpu_per_query_second == pytest.approx(1.0, rel=0.01)
    # sum(w x y) / sum(w x x) with w = 1 / y²: (1 + 0.5 + 0.5) / (1 + 0.25 + 0.25)
    assert relative.cpu_per_query_second == pytest.approx(2 / 1.5)


def test_fit_of_collinear_samples_uses_one_coefficient() -> None:
    samples = [(UsageTotals(queries=1000 * k, query_seconds=k), 0.5 * k) for k in (1, 2, 3)]
    model = fit_cpu(samples)
    assert estimate(UsageTotals(queries=4000, query_seconds=4), model).cpu_seconds == pytest.approx(2.0)


def test_fit_without_samples_is_an_error() -> None:
    with pytest.raises(ValueError):
        fit_cpu([])


def test_tenant_factors_only_for_tenants_with_enough_cpu() -> None:
    factors = tenant_factors({"a": (UsageTotals(query_seconds=10), 12.0), "b": (UsageTotals(query_seconds=1), 0.5)},
                             UNIT, min_cpu_seconds=1.0)
    assert factors == {"a": pytest.approx(1.2)}


def test_calibration_factor_and_the_twenty_percent_alert() -> None:
    assert calibrate(110.0, 100.0).factor == pytest.approx(1.1)
    assert not calibrate(110.0, 100.0).alert
    assert not calibrate(120.0, 100.0).alert  # exactly 20 %: still within
    high, low = calibrate(121.0, 100.0), calibrate(79.0, 100.0)
    assert high.alert and high.variance_ratio == pytest.approx(0.21)
    assert low.alert and low.factor == pytest.approx(0.79)
    nothing_estimated = calibrate(5.0, 0.0)
    assert nothing_estimated.alert and math.isinf(nothing_estimated.variance_ratio)


def test_warning_levels() -> None:
    assert warning_level(7.9, 10) is None
    assert warning_level(8.0, 10) == "80"
    assert warning_level(10.0, 10) == "100"
    assert warning_level(50.0, 0) is None


def test_report_included_overage_cost_and_margin() -> None:
    hour = HOUR
    inputs = [
        # 12 vCPU-hours on PRO: 2 over the 10 included at $2 -> revenue 54.
        whole_month("ns/heavy", "PRO", UsageTotals(queries=500, query_seconds=12 * hour), PRO),
        # 3 vCPU-hours on PRO: within the included amount -> revenue 50.
        whole_month("ns/light", "PRO", UsageTotals(queries=100, query_seconds=3 * hour), PRO),
        # 5 vCPU-hours on FREE, 1 included, no overage sold -> revenue 0.
        whole_month("ns/free", "FREE", UsageTotals(queries=50, query_seconds=5 * hour), FREE),
    ]
    # The bill: 20 vCPU-hours measured (factor 1), $40, of which $30 is CPU and $10 is split evenly.
    bill = BillMeasurement(cpu_vcpu_seconds=20 * hour, memory_gb_seconds=0.0, cost_usd=40.0, cpu_cost_usd=30.0)
    report = build_report(inputs, bill)
    assert report.calibration is not None
    assert report.calibration.factor == pytest.approx(1.0) and not report.calibration.alert
    by_name = {line.name: line for line in report.tenants}

    heavy = by_name["ns/heavy"]
    assert heavy.vcpu_hours == pytest.approx(12.0)
    assert heavy.overage_vcpu_hours == pytest.approx(2.0)
    assert heavy.overage_usd == pytest.approx(4.0)
    assert heavy.revenue_usd == pytest.approx(54.0)
    assert heavy.cost_usd == pytest.approx(30 * 12 / 20 + 10 / 3)
    assert heavy.margin == pytest.approx((54 - (18 + 10 / 3)) / 54)  # 0.605
    assert heavy.below_target

    light = by_name["ns/light"]
    assert light.overage_vcpu_hours == 0.0 and light.overage_usd == 0.0
    assert light.cost_usd == pytest.approx(30 * 3 / 20 + 10 / 3)
    assert light.margin == pytest.approx((50 - 4.5 - 10 / 3) / 50) and not light.below_target

    free = by_name["ns/free"]
    assert free.overage_vcpu_hours == pytest.approx(4.0)
    assert free.overage_usd == 0.0  # no overage price: not sold
    assert free.margin == -math.inf and free.below_target

    tiers = {line.name: line for line in report.tiers}
    assert tiers["PRO"].revenue_usd == pytest.approx(104.0)
    assert tiers["PRO"].cost_usd == pytest.approx(30 * 15 / 20 + 20 / 3)
    assert tiers["PRO"].margin == pytest.approx((104 - 22.5 - 20 / 3) / 104)  # 0.72
    assert not tiers["PRO"].below_target
    assert tiers["FREE"].below_target
    assert report.total.cost_usd == pytest.approx(40.0)
    assert report.total.revenue_usd == pytest.approx(104.0)
    assert report.total.margin == pytest.approx((104 - 40) / 104)

    assert {(w.tenant, w.level) for w in report.warnings} == {("ns/heavy", "100"), ("ns/free", "100")}
    assert report.included_ratio["ns/light"] == pytest.approx(0.3)


def test_report_calibrates_to_the_bill_but_bills_the_model_and_flags_low_margins() -> None:
    hour = HOUR
    inputs = [whole_month("ns/a", "PRO", UsageTotals(query_seconds=4 * hour), PRO),
              whole_month("ns/b", "PRO", UsageTotals(query_seconds=8 * hour), PRO)]
    # 18 vCPU-hours billed against 12 estimated: factor 1.5, an alert; whole cost follows CPU.
    report = build_report(inputs, BillMeasurement(18 * hour, 0.0, cost_usd=100.0))
    assert report.calibration is not None
    assert report.calibration.factor == pytest.approx(1.5) and report.calibration.alert
    a, b = report.tenants
    assert (a.vcpu_hours, a.vcpu_hours_calibrated) == (pytest.approx(4.0), pytest.approx(6.0))
    # Revenue is what the engine judged and the invoice charges: the model's 8 hours, not the calibrated 12.
    assert (b.vcpu_hours, b.vcpu_hours_calibrated) == (pytest.approx(8.0), pytest.approx(12.0))
    assert b.overage_usd == pytest.approx(0.0)
    assert a.cost_usd == pytest.approx(100 / 3) and b.cost_usd == pytest.approx(200 / 3)
    assert a.margin == pytest.approx(1 / 3) and a.below_target
    assert [w.level for w in report.warnings] == ["80"]  # b at 80 % by the model (120 % calibrated)
    assert report.tiers[0].margin == pytest.approx(0.0)


def test_report_without_a_bill_has_no_cost_or_margin() -> None:
    report = build_report([whole_month("ns/a", "PRO", UsageTotals(query_seconds=3600), PRO)], None)
    line = report.tenants[0]
    assert line.cost_usd is None and line.margin is None and not line.below_target
    assert report.calibration is None and report.total.cost_usd is None


# -- a month cut by tier and priced -------------------------------------------------------------

OCTOBER = "2026-10"  # 31 days: 744 hours
START, END = month_bounds(OCTOBER)
STARTER = BillingEffective(base_fee_usd=10.0, included_vcpu_hours=25.0, overage_per_vcpu_hour_usd=0.15)
PRO_PRICE = BillingEffective(base_fee_usd=50.0, included_vcpu_hours=200.0, overage_per_vcpu_hour_usd=0.12)


def at(day: int, hour: int = 0, month: int = 10) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, tzinfo=dt.UTC)


def change(from_tier: str | None, to_tier: str, when: dt.datetime) -> TierChange:
    return TierChange.model_validate({"from": from_tier, "to": to_tier, "at": when})


def test_months_and_cents() -> None:
    assert (at(1), at(1, month=11)) == (START, END) and len(month_hours(OCTOBER)) == 744
    assert month_hours("2026-12").stop == int(dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()) // 3600
    assert previous_month(at(1, 0, month=11)) == OCTOBER
    assert previous_month(dt.datetime(2027, 1, 5, tzinfo=dt.UTC)) == "2026-12"
    for bad in ("2026-13", "26-10", "2026-1", ""):
        with pytest.raises(ValueError, match="expected YYYY-MM"):
            month_bounds(bad)
    assert [usd_cents(x) for x in (1.005, 2.675, 0.004999, 10.0, 0.0)] == [101, 268, 0, 1000, 0]  # half up


def test_tier_hours_follow_the_history() -> None:
    history = [change(None, "STARTER", at(3, month=9)), change("STARTER", "PRO", at(11)),
               change("PRO", "STARTER", at(21, 12)), change("STARTER", "FREE", at(5, month=11))]
    assert tier_hours(history, "FREE", START, END) == pytest.approx({"STARTER": 240 + 252, "PRO": 252})
    # Created on the 11th: nothing before it.
    assert tier_hours([change(None, "PRO", at(11))], "PRO", START, END) == pytest.approx({"PRO": 504})
    # No history (no status store): the whole month on the fallback tier.
    assert tier_hours([], "PRO", START, END) == {"PRO": 744.0}
    # History cut to its last entries: the first one still says where the month began.
    assert tier_hours([change("FREE", "PRO", at(11))], None, START, END) == pytest.approx({"FREE": 240, "PRO": 504})


def test_a_creation_after_metered_hours_does_not_erase_them() -> None:
    first = month_hours(OCTOBER).start
    hours = metered_hours([{"tenant": "ns/a", "hour": first + 3, "tier": "STARTER", "query_seconds": 1.0}])
    # The status store was empty until the 20th: the engine recorded a "creation" then.
    history = completed_history([change(None, "STARTER", at(20))], hours)
    assert tier_hours(history, None, START, END) == {"STARTER": 744.0}
    unmetered = completed_history([change(None, "STARTER", at(20))], [])
    assert tier_hours(unmetered, None, START, END) == pytest.approx({"STARTER": 12 * 24})


def test_usage_goes_to_the_tier_recorded_with_its_hour() -> None:
    first = month_hours(OCTOBER).start
    docs = [{"tenant": "ns/a", "hour": first + 5, "tier": "STARTER", "query_seconds": 10.0, "queries": 1},
            {"tenant": "ns/a", "hour": first + 300, "tier": "PRO", "query_seconds": 20.0, "queries": 2},
            # Counters older than the tier field: the history's tier at that hour (PRO from the 11th).
            {"tenant": "ns/a", "hour": first + 400, "query_seconds": 5.0, "queries": 1}]
    history = [change("STARTER", "PRO", at(11))]
    by_tier = usage_by_tier(metered_hours(docs), history, "PRO")
    assert by_tier == {"STARTER": UsageTotals(1, 10.0, 0), "PRO": UsageTotals(3, 25.0, 0)}


def test_a_mid_month_upgrade_prices_each_tier_for_its_own_hours() -> None:
    # STARTER for 240 hours with 20 vCPU-hours, then PRO for 504 hours with 100 vCPU-hours.
    month = price_tenant_month(
        "ns/a", "org-a", "PRO", {"STARTER": 240.0, "PRO": 504.0},
        {"STARTER": UsageTotals(query_seconds=20 * HOUR), "PRO": UsageTotals(query_seconds=100 * HOUR)},
        {"STARTER": STARTER, "PRO": PRO_PRICE}, 744.0, FittedModel(UNIT))
    starter, pro = sorted(month.parts, key=lambda p: p.tier != "STARTER")
    assert starter.included_vcpu_hours == pytest.approx(25 * 240 / 744)  # 8.06
    assert starter.overage_vcpu_hours == pytest.approx(20 - 25 * 240 / 744)
    assert starter.base_fee_usd == pytest.approx(10 * 240 / 744)
    assert pro.included_vcpu_hours == pytest.approx(200 * 504 / 744) and pro.overage_vcpu_hours == 0.0
    assert month.base_fee_usd == pytest.approx(10 * 240 / 744 + 50 * 504 / 744)
    assert month.overage_usd == pytest.approx((20 - 25 * 240 / 744) * 0.15)  # 1.79; the last hour's tier: 0
    assert month.overage_cents == 179 and month.vcpu_hours == pytest.approx(120.0)


MANIFEST_POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "default"},
    "spec": {"tiers": {
        "STARTER": {"rank": 1, "billing": {"baseFeeUSD": 10, "includedVcpuHours": 25, "overagePerVcpuHourUSD": 0.15}},
        "PRO": {"rank": 2, "billing": {"baseFeeUSD": 50, "includedVcpuHours": 200, "overagePerVcpuHourUSD": 0.12}},
    }},
})


def declared(name: str, tier: str, overrides: dict[str, object] | None = None) -> TenantDatabase:
    spec: dict[str, object] = {"orgId": f"org-{name}", "tier": tier}
    if overrides:
        spec["overrides"] = overrides
    return TenantDatabase.model_validate({"apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                                          "metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def test_price_month_from_history_counters_overrides_and_the_model() -> None:
    first = month_hours(OCTOBER).start
    statuses = {"ns/moved": TenantDatabaseStatus.model_validate(
        {"appliedTier": "PRO", "history": [{"from": "STARTER", "to": "PRO", "at": at(11).isoformat()}]})}
    docs = [
        {"tenant": "ns/moved", "hour": first + 10, "tier": "STARTER", "query_seconds": 20 * HOUR, "queries": 9},
        {"tenant": "ns/moved", "hour": first + 600, "tier": "PRO", "query_seconds": 100 * HOUR, "queries": 9},
        # Over its override's 5 included hours, priced at the override.
        {"tenant": "ns/custom", "hour": first + 1, "tier": "STARTER", "query_seconds": 7 * HOUR},
        {"tenant": "ns/gone", "hour": first + 2, "tier": "STARTER", "query_seconds": 30 * HOUR},
    ]
    tenants = [declared("moved", "PRO"), declared("idle", "PRO"),
               declared("custom", "STARTER", {"billing": {"includedVcpuHours": 5, "overagePerVcpuHourUSD": 1}})]
    model = FittedModel(UNIT, {"ns/custom": 2.0}, version=7, source="test")
    pricing = price_month(OCTOBER, {"default": MANIFEST_POLICY}, tenants, statuses, docs, model, "redis")
    assert [t.tenant for t in pricing.tenants] == ["ns/custom", "ns/gone", "ns/idle", "ns/moved"]
    moved = pricing.tenant("ns/moved")
    assert (moved.org_id, moved.tier, moved.overage_cents) == ("org-moved", "PRO", 179)
    idle = pricing.tenant("ns/idle")  # no usage, no history: the whole month's base fee
    assert (idle.base_fee_usd, idle.vcpu_hours, idle.overage_cents) == (50.0, 0.0, 0)
    custom = pricing.tenant("ns/custom")  # 7 query-hours x its factor 2 = 14 vCPU-hours, 9 over at $1
    assert (custom.vcpu_hours, custom.overage_usd) == (pytest.approx(14.0), pytest.approx(9.0))
    gone = pricing.tenant("ns/gone")  # metered, not declared: STARTER of the default policy, whole month
    assert gone.org_id is None and gone.overage_usd == pytest.approx((30 - 25) * 0.15)
    assert "ns/gone: metered but not declared; priced as tier STARTER" in pricing.notes
    assert pricing.model.version == 7


def test_model_documents_round_trip_and_bad_values_name_the_key() -> None:
    model = CostModel(0.5, 0.001, 0.03, 0.7)
    assert model_from_document(model_document(model, {"ns/a": 1.25}), "x") == (model, {"ns/a": 1.25})
    assert model_from_document({"cpuPerQuerySecond": 0.3}, "x")[0] == CostModel(cpu_per_query_second=0.3)
    for doc, fragment in (({"cpuPerQuerySecond": -1}, "cpuPerQuerySecond: -1 is not a number >= 0"),
                          ({"cpuPerQuerySecond": "fast"}, "cpuPerQuerySecond: 'fast'"),
                          ({"tenantFactors": {"ns/a": 0}}, "tenantFactors.ns/a: 0 is not a number > 0"),
                          ({"cpuPerQuerySeconds": 1}, "unknown keys ['cpuPerQuerySeconds']")):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            model_from_document(doc, "model.json")
    scaled = FittedModel(model).scaled(2.0, 0.5)
    assert scaled == CostModel(1.0, 0.002, 0.015, 0.35)
    assert FittedModel(model).scaled(2.0, None).memory_gb_per_query_second == 0.03
