"""The cost model, its calibration and the report's arithmetic (pure functions)."""

from __future__ import annotations

import math
import random

import pytest

from dynabase.desired.cost import (
    BillMeasurement,
    CostModel,
    TenantInput,
    UsageTotals,
    build_report,
    calibrate,
    estimate,
    fit_cpu,
    tenant_factors,
    warning_level,
)
from dynabase.desired.effective import BillingEffective

PRO = BillingEffective(base_fee_usd=50.0, included_vcpu_hours=10.0, overage_per_vcpu_hour_usd=2.0)
FREE = BillingEffective(base_fee_usd=0.0, included_vcpu_hours=1.0)
# One vCPU-second per query-second, nothing per query: usage in query-seconds is CPU.
UNIT = CostModel(cpu_per_query_second=1.0, cpu_per_query=0.0)


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
    hour = 3600.0
    inputs = [
        # 12 vCPU-hours on PRO: 2 over the 10 included at $2 -> revenue 54.
        TenantInput("ns/heavy", "PRO", UsageTotals(queries=500, query_seconds=12 * hour), PRO),
        # 3 vCPU-hours on PRO: within the included amount -> revenue 50.
        TenantInput("ns/light", "PRO", UsageTotals(queries=100, query_seconds=3 * hour), PRO),
        # 5 vCPU-hours on FREE, 1 included, no overage sold -> revenue 0.
        TenantInput("ns/free", "FREE", UsageTotals(queries=50, query_seconds=5 * hour), FREE),
    ]
    # The bill: 20 vCPU-hours measured (factor 1), $40, of which $30 is CPU and $10 is split evenly.
    bill = BillMeasurement(cpu_vcpu_seconds=20 * hour, memory_gb_seconds=0.0, cost_usd=40.0, cpu_cost_usd=30.0)
    report = build_report(inputs, UNIT, bill)
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


def test_report_calibrates_to_the_bill_and_flags_low_margins() -> None:
    hour = 3600.0
    inputs = [TenantInput("ns/a", "PRO", UsageTotals(query_seconds=4 * hour), PRO),
              TenantInput("ns/b", "PRO", UsageTotals(query_seconds=6 * hour), PRO)]
    # 15 vCPU-hours billed against 10 estimated: factor 1.5, an alert; whole cost follows CPU.
    report = build_report(inputs, UNIT, BillMeasurement(15 * hour, 0.0, cost_usd=100.0))
    assert report.calibration is not None
    assert report.calibration.factor == pytest.approx(1.5) and report.calibration.alert
    a, b = report.tenants
    assert (a.vcpu_hours_estimated, a.vcpu_hours) == (pytest.approx(4.0), pytest.approx(6.0))
    assert b.vcpu_hours == pytest.approx(9.0)
    assert b.overage_usd == pytest.approx(0.0)
    assert a.cost_usd == pytest.approx(40.0) and b.cost_usd == pytest.approx(60.0)
    assert a.margin == pytest.approx(0.2) and a.below_target
    assert [w.level for w in report.warnings] == ["80"]  # b at 90 %
    assert report.tiers[0].margin == pytest.approx(0.0)


def test_report_without_a_bill_has_no_cost_or_margin() -> None:
    report = build_report([TenantInput("ns/a", "PRO", UsageTotals(query_seconds=3600), PRO)], UNIT, None)
    line = report.tenants[0]
    assert line.cost_usd is None and line.margin is None and not line.below_target
    assert report.calibration is None and report.total.cost_usd is None
