"""`dynabase usage report`: a month of metered usage against the tiers' prices and
the real bill (see ``dynabase.desired.cost`` for the arithmetic)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from dynabase.backends.mongo import MongoBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.cost import (
    MARGIN_TARGET,
    BillMeasurement,
    CostModel,
    Line,
    Report,
    TenantInput,
    UsageTotals,
    usage_by_tenant,
)
from dynabase.desired.effective import DEFAULTS, BillingEffective, ResolveError, effective_limits, merge
from dynabase.desired.mongo import rollup
from dynabase.spec import TenantDatabase, TierPolicy

MONTH_PATTERN = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
DEFAULT_POLICY = "default"
FORMATS = ("table", "csv", "json")


async def railway_bill(service: str, month: str) -> BillMeasurement:
    """The month's bill from Railway's usage query for ``projectId/serviceId`` (token from the environment)."""
    from dynabase.backends.railway import RailwayBackend
    from dynabase.engine.runtime import RailwaySettings

    from .bill import RailwayBillSource

    project_id, _, service_id = service.partition("/")
    if not project_id or not service_id:
        raise ValueError(f"--bill-railway {service!r}: expected projectId/serviceId of the database service")
    settings = RailwaySettings.from_env()
    if settings is None:
        raise ValueError("--bill-railway needs DYNABASE_RAILWAY_TOKEN or DYNABASE_RAILWAY_PROJECT_TOKEN")
    backend = RailwayBackend.from_settings(settings.token, settings.token_kind, settings.url, settings.hourly_budget)
    try:
        return await RailwayBillSource(backend, project_id, service_id).measured(month)
    finally:
        await backend.close()


def month_hours(month: str) -> range:
    """The month's hours as the proxy numbers them (UTC hours since the epoch)."""
    matched = MONTH_PATTERN.match(month)
    if not matched:
        raise ValueError(f"--month must be YYYY-MM, not {month!r}")
    year, number = int(matched[1]), int(matched[2])
    start = dt.datetime(year, number, 1, tzinfo=dt.UTC)
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=dt.UTC)
    return range(int(start.timestamp()) // 3600, int(end.timestamp()) // 3600)


async def load_usage(hours: range, *, mongo_url: str | None,
                     redis_url: str | None) -> tuple[str, dict[str, tuple[UsageTotals, str | None]]]:
    """From MongoDB's tenantUsage when configured (the engine's hourly copy), else
    straight from the proxies' Redis hashes. Returns the source's name and the usage."""
    if mongo_url:
        mongo = MongoBackend(mongo_url)
        try:
            return "mongo", usage_by_tenant(await mongo.read_usage(hours))
        except PyMongoError as exc:
            raise ConnectionError(f"cannot read tenantUsage from MongoDB: {exc}") from None
        finally:
            await mongo.close()
    if not redis_url:
        raise ValueError("set DYNABASE_MONGO_URL or DYNABASE_REDIS_URL: where the usage is")
    proxy = ProxyBackend(redis_url)
    try:
        by_hour = await proxy.usage_fields_for_hours(hours)
    except RedisError as exc:
        raise ConnectionError(f"cannot read usage from Redis: {exc}") from None
    finally:
        await proxy.close()
    docs = [doc for hour, fields in by_hour.items() for doc in rollup(hour, fields).values()]
    return "redis", usage_by_tenant(docs)


@dataclass(frozen=True)
class ModelFile:
    model: CostModel
    tenant_factors: dict[str, float]


_MODEL_KEYS = {
    "cpuPerQuerySecond": "cpu_per_query_second",
    "cpuPerQuery": "cpu_per_query",
    "memoryGbPerQuerySecond": "memory_gb_per_query_second",
    "memoryGbSecondsPerConnection": "memory_gb_seconds_per_connection",
}


def load_model(path: Path | None) -> ModelFile:
    """Coefficients (as bench.attribution writes them) and per-tenant factors; defaults without a file."""
    if path is None:
        return ModelFile(CostModel(), {})
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(raw) - set(_MODEL_KEYS) - {"tenantFactors"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}, tenantFactors")
    values = {field: float(raw[key]) for key, field in _MODEL_KEYS.items() if key in raw}
    factors = {str(k): float(v) for k, v in (raw.get("tenantFactors") or {}).items()}
    return ModelFile(CostModel(**values), factors)


def model_document(model: CostModel, tenant_factors: Mapping[str, float]) -> dict[str, Any]:
    doc: dict[str, Any] = {key: getattr(model, field) for key, field in _MODEL_KEYS.items()}
    if tenant_factors:
        doc["tenantFactors"] = dict(tenant_factors)
    return doc


def _tier_billing(policy: TierPolicy | None, tier_name: str) -> BillingEffective | None:
    if policy is None or tier_name not in policy.spec.tiers:
        return None
    tier = policy.spec.tiers[tier_name]
    return merge(tier_name, tier.rank, [tier]).billing


def resolve_inputs(usage: Mapping[str, tuple[UsageTotals, str | None]], policies: Mapping[str, TierPolicy],
                   tenants: Sequence[TenantDatabase],
                   tenant_factors: Mapping[str, float]) -> tuple[list[TenantInput], list[str]]:
    """Every declared tenant (it pays its base fee even without usage) and every metered one.

    Tier: the one the proxy recorded for the tenant's latest hour (the applied tier,
    which lags the declared one during a downgrade grace period), else the declared
    tier. Billing: the tier with the tenant's overrides; a metered tenant no longer
    declared is priced by its recorded tier in the "default" (or only) TierPolicy.
    """
    notes: list[str] = []
    inputs: list[TenantInput] = []
    declared = {t.key: t for t in tenants}
    fallback_policy = policies.get(DEFAULT_POLICY) or (next(iter(policies.values())) if len(policies) == 1 else None)
    for key in sorted(set(declared) | set(usage)):
        totals, recorded_tier = usage.get(key, (UsageTotals(), None))
        factor = tenant_factors.get(key, 1.0)
        tenant = declared.get(key)
        billing: BillingEffective | None = None
        tier_name = recorded_tier or (tenant.spec.tier if tenant else "")
        if tenant is not None:
            policy = policies.get(tenant.spec.tier_policy_ref)
            if policy is not None and tier_name not in policy.spec.tiers:
                tier_name = tenant.spec.tier
            try:
                billing = effective_limits(tenant, policy, tier_name).billing if policy else None
            except ResolveError as exc:
                notes.append(f"{key}: {exc.message}")
        else:
            billing = _tier_billing(fallback_policy, tier_name)
            if billing is not None:
                notes.append(f"{key}: metered but not declared; priced as tier {tier_name}")
        if billing is None:
            notes.append(f"{key}: tier '{tier_name or '?'}' not found in the manifests; priced at the defaults")
            billing = BillingEffective(**DEFAULTS["billing"])
        inputs.append(TenantInput(key, tier_name or "?", totals, billing, factor))
    return inputs, notes


# -- rendering ----------------------------------------------------------------------

COLUMNS = ("scope", "name", "tier", "queries", "vcpu_hours_estimated", "vcpu_hours", "included_vcpu_hours",
           "overage_vcpu_hours", "base_fee_usd", "overage_usd", "revenue_usd", "cost_usd", "margin",
           "below_target", "warning")


def _margin_value(line: Line) -> float | None:
    margin = line.margin
    return None if margin is None or math.isinf(margin) else round(margin, 4)


def _row(scope: str, line: Line, warning: str) -> dict[str, Any]:
    return {
        "scope": scope, "name": line.name, "tier": line.tier, "queries": round(line.queries),
        "vcpu_hours_estimated": round(line.vcpu_hours_estimated, 4), "vcpu_hours": round(line.vcpu_hours, 4),
        "included_vcpu_hours": round(line.included_vcpu_hours, 4),
        "overage_vcpu_hours": round(line.overage_vcpu_hours, 4),
        "base_fee_usd": round(line.base_fee_usd, 2), "overage_usd": round(line.overage_usd, 2),
        "revenue_usd": round(line.revenue_usd, 2),
        "cost_usd": None if line.cost_usd is None else round(line.cost_usd, 2),
        "margin": _margin_value(line), "below_target": line.below_target, "warning": warning,
    }


def rows(report: Report) -> list[dict[str, Any]]:
    warned = {w.tenant: w.level for w in report.warnings}
    out = [_row("tenant", line, warned.get(line.name, "")) for line in report.tenants]
    out += [_row("tier", line, "") for line in report.tiers]
    out.append(_row("total", report.total, ""))
    return out


def render_json(report: Report, month: str, source: str, notes: Sequence[str]) -> str:
    calibration = report.calibration
    bill = report.bill
    doc = {
        "month": month, "source": source, "marginTarget": MARGIN_TARGET,
        "calibration": None if calibration is None else {
            "factor": round(calibration.factor, 6),
            "varianceRatio": None if math.isinf(calibration.variance_ratio) else round(calibration.variance_ratio, 6),
            "alert": calibration.alert,
            "memoryFactor": None if report.memory_factor is None else round(report.memory_factor, 6),
        },
        "bill": None if bill is None else {
            "cpuVcpuSeconds": bill.cpu_vcpu_seconds, "memoryGbSeconds": bill.memory_gb_seconds,
            "costUSD": bill.cost_usd, "cpuCostUSD": bill.cpu_cost_usd,
        },
        "rows": rows(report),
        "warnings": [{"tenant": w.tenant, "tier": w.tier, "level": w.level, "vcpuHours": round(w.vcpu_hours, 4),
                      "includedVcpuHours": w.included_vcpu_hours} for w in report.warnings],
        "notes": list(notes),
    }
    return json.dumps(doc, indent=2)


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(report):
        writer.writerow({**row, "cost_usd": "" if row["cost_usd"] is None else row["cost_usd"],
                         "margin": "" if row["margin"] is None else row["margin"],
                         "below_target": "!" if row["below_target"] else ""})
    return buffer.getvalue()


def _margin_text(line: Line) -> str:
    margin = line.margin
    if margin is None:
        return "-"
    return "no revenue" if math.isinf(margin) else f"{margin * 100:.1f}%"


def render_table(report: Report, month: str, source: str, notes: Sequence[str]) -> str:
    header = ("", "tenant / tier", "tier", "queries", "vCPU-h est", "vCPU-h", "incl", "over", "base $",
              "overage $", "revenue $", "cost $", "margin", "warn")
    table: list[tuple[str, ...]] = [header]
    warned = {w.tenant: w.level for w in report.warnings}

    def cells(line: Line, name: str, warning: str) -> tuple[str, ...]:
        return ("!" if line.below_target else "", name, line.tier, f"{line.queries:.0f}",
                f"{line.vcpu_hours_estimated:.3f}", f"{line.vcpu_hours:.3f}", f"{line.included_vcpu_hours:g}",
                f"{line.overage_vcpu_hours:.3f}", f"{line.base_fee_usd:.2f}", f"{line.overage_usd:.2f}",
                f"{line.revenue_usd:.2f}", "-" if line.cost_usd is None else f"{line.cost_usd:.2f}",
                _margin_text(line), f"{warning}%" if warning else "")

    table += [cells(line, line.name, warned.get(line.name, "")) for line in report.tenants]
    table += [cells(line, f"tier {line.name}", "") for line in report.tiers]
    table.append(cells(report.total, "all tenants", ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"usage {month} (from {source}); '!' = gross margin under {MARGIN_TARGET:.0%}"]
    for row in table:
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    calibration = report.calibration
    if calibration is None:
        lines.append("no bill for this month: vCPU-hours are uncalibrated, cost and margin unknown")
    else:
        lines.append(f"calibration factor {calibration.factor:.3f} (billed / estimated CPU)"
                     + (" — ALERT: more than 20% off, refit the model" if calibration.alert else ""))
        if report.memory_factor is not None:
            lines.append(f"memory factor {report.memory_factor:.3f} (billed / estimated GB-seconds)")
    for warning in report.warnings:
        lines.append(f"warning: {warning.tenant} ({warning.tier}) at {warning.level}% of its included vCPU-hours "
                     f"({warning.vcpu_hours:.3f} of {warning.included_vcpu_hours:g})")
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


async def run_report(month: str, manifests: Sequence[str], *, output_format: str, bill_path: Path | None,
                     model_path: Path | None, metrics_file: Path | None, mongo_url: str | None,
                     redis_url: str | None, railway_service: str | None = None,
                     kube_event: bool = False) -> tuple[str, list[str]]:
    """The rendered report and the messages for stderr (notes, alerts). Raises ValueError
    for anything the caller must fix (month, manifests, files, URLs)."""
    from dynabase.desired.cost import build_report
    from dynabase.spec.documents import load_paths

    from . import metrics
    from .bill import StaticBillSource

    hours = month_hours(month)
    loaded = load_paths(manifests)
    if loaded.errors:
        raise ValueError("\n".join(str(error) for error in loaded.errors))
    policies = {d.resource.name: d.resource for d in loaded.documents if isinstance(d.resource, TierPolicy)}
    tenants = [d.resource for d in loaded.documents if isinstance(d.resource, TenantDatabase)]
    if not policies:
        raise ValueError("no TierPolicy in the manifests given: prices come from the tiers' billing sections")
    model = load_model(model_path)
    bill = await StaticBillSource(bill_path).measured(month) if bill_path else None
    if railway_service is not None:
        bill = await railway_bill(railway_service, month)
    source, usage = await load_usage(hours, mongo_url=mongo_url, redis_url=redis_url)
    inputs, notes = resolve_inputs(usage, policies, tenants, model.tenant_factors)
    report = build_report(inputs, model.model, bill)
    metrics.publish(report)
    if metrics_file is not None:
        metrics.write_textfile(metrics_file)
    messages = list(notes) if output_format != "table" else []
    if report.calibration is not None and report.calibration.alert:
        alert = (f"calibration for {month}: billed CPU / estimated CPU = {report.calibration.factor:.3f}, more "
                 "than 20% from 1; refit the model (bench.attribution) on the database host")
        messages.append(f"calibration alert: {alert}")
        if kube_event:
            from .alerts import post_event

            await post_event(next(iter(sorted(policies))), "CalibrationVariance", alert)
    if output_format == "json":
        return render_json(report, month, source, notes), messages
    if output_format == "csv":
        return render_csv(report), messages
    return render_table(report, month, source, notes), messages
