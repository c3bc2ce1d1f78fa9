"""The portal's pages without servers: limits rendered from their declarations, the projection across a
tier change, the chart, escaping."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ElementTree

from dynabase.backends.events_pg import StoredEvent
from dynabase.desired.charges import price_month
from dynabase.desired.cost import FittedModel
from dynabase.desired.effective import effective_limits
from dynabase.desired.projection import project_month
from dynabase.portal import render
from dynabase.portal.chart import usage_chart
from dynabase.portal.data import TenantPage, limit_rows, next_tier
from dynabase.spec import TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.limits import FIELDS

from .engine_helpers import example_policy, make_tenant

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def test_every_declared_limit_is_a_row_beside_the_next_tiers() -> None:
    """Generic: a limit added to spec/limits.py shows up without touching the portal."""
    policy = example_policy()
    tenant = make_tenant("pp_rows", "FREE")
    assert next_tier(policy, "FREE") == "STARTER" and next_tier(policy, "ENTERPRISE") is None
    rows = limit_rows(tenant, effective_limits(tenant, policy, "FREE"), effective_limits(tenant, policy, "STARTER"))
    shown = {(row.section, row.description) for row in rows}
    for section, declared in FIELDS.items():
        for field in declared:
            if section == "railway":  # only for a tenant with a Railway service
                assert (section, field.limit.description) not in shown
                continue
            both_unset = not field.is_unlimited(None) and all(
                field.read(effective_limits(tenant, policy, t)) is None for t in ("FREE", "STARTER"))
            assert ((section, field.limit.description) in shown) != both_unset, (section, field.name)
    by_label = {row.label: row for row in rows}
    assert (by_label["queries/s"].current, by_label["queries/s"].next, by_label["queries/s"].changed) == \
        ("10", "50", True)
    assert (by_label["idle timeout"].current, by_label["idle timeout"].next) == ("5m", "15m")
    assert (by_label["overage per vCPU hour USD"].current, by_label["overage per vCPU hour USD"].next) == \
        ("no overage sold", "$0.15")


def _docs(key: str, tier: str, hours: range, query_seconds: float) -> list[dict[str, object]]:
    return [{"tenant": key, "hour": h, "tier": tier, "queries": 100, "query_seconds": query_seconds,
             "connections": 1} for h in hours]


def test_a_projection_keeps_the_hours_before_an_upgrade_on_their_tier() -> None:
    policy = example_policy()
    tenant = make_tenant("pp_proj", "STARTER")
    key = tenant.key
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    upgrade = dt.datetime(2026, 11, 10, tzinfo=dt.UTC)
    status = TenantDatabaseStatus.model_validate({"appliedTier": "STARTER", "history": [
        {"from": None, "to": "FREE", "at": start}, {"from": "FREE", "to": "STARTER", "at": upgrade}]})
    first, change, now_hour = (int(t.timestamp()) // 3600 for t in (start, upgrade, NOW))
    docs = _docs(key, "FREE", range(first, change), 60.0) + _docs(key, "STARTER", range(change, now_hour), 120.0)
    policies = {"default": policy}
    projection = project_month("2026-11", policies, tenant, status, docs, FittedModel(), NOW, "PRO")
    to_date = price_month("2026-11", policies, [tenant], {key: status}, docs, FittedModel(), "").tenant(key)
    assert projection.to_date == to_date
    parts = {p.tier: p for p in projection.projected.parts}
    assert parts["FREE"].usage == {p.tier: p for p in to_date.parts}["FREE"].usage  # the past stays where it was
    assert parts["STARTER"].usage.query_seconds > {p.tier: p for p in to_date.parts}["STARTER"].usage.query_seconds
    assert projection.elapsed_hours == (NOW - start).total_seconds() / 3600
    total = sum(p.usage.query_seconds for p in projection.projected.parts)
    assert abs(total - sum(p.usage.query_seconds for p in to_date.parts) * 720 / projection.elapsed_hours) < 1e-6
    assert projection.on_next_tier is not None and {p.tier for p in projection.on_next_tier.parts} == {"PRO"}
    assert projection.on_next_tier.included_vcpu_hours == 200


def test_the_chart_is_well_formed_svg_that_stops_at_now() -> None:
    daily = [1.0] * 19 + [0.5] + [0.0] * 10
    svg = usage_chart(daily, elapsed_days=19.5, included=25.0, projected=30.0)
    root = ElementTree.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    polyline = root.find(f"{ns}polyline") if root.find(f"{ns}polyline") is not None else root.find("polyline")
    assert polyline is not None
    points = [tuple(map(float, p.split(","))) for p in polyline.attrib["points"].split()]
    assert len(points) == 21  # the origin, 19 whole days, and today up to now
    assert "19.50 of 25.00 included vCPU-hours used so far; 30.00 projected" in svg


def test_text_from_outside_is_escaped() -> None:
    raw: TierPolicy = example_policy()
    tenant: TenantDatabase = make_tenant("pp_esc", "FREE")
    event = StoredEvent("evt_x", tenant.key, "org", "pp_esc", "FREE", "Warning", "UsageWarning",
                        '<script>alert("x")</script>', NOW)
    page = TenantPage(tenant, None, "FREE", None, "2026-11", NOW,
                      limit_rows(tenant, effective_limits(tenant, raw, "FREE"), None), [event])
    html = render.tenant_page(page, "/portal/", 'csrf"><b>')
    assert "<script>" not in html and "&lt;script&gt;" in html and 'value="csrf&quot;&gt;&lt;b&gt;"' in html
