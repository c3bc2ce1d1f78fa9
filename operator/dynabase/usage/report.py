"""`dynabase usage report`: a month of metered usage against the tiers' prices and
the real bill (``dynabase.desired.charges`` prices the month, ``dynabase.desired.margin``
attributes the bill).

The month is read and priced exactly as the billing close reads and prices it
(``dynabase.usage.month``): the stored cost model in force at the month's end, the
tiers' hours from status history. A bill calibrates and sets cost and margin; it
never changes what was billed. ``--write-model`` stores a new model version —
the ``--model`` file, calibrated by the bill when one is given — for the engine,
later reports and closes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynabase.desired.charges import month_hours, usd_cents
from dynabase.desired.cost import BillMeasurement, FittedModel, model_document
from dynabase.desired.margin import MARGIN_TARGET, Line, Report, build_report

from .month import MonthReader, load_declared, open_month_reader

__all__ = ["model_document", "month_hours", "run_report"]
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


async def write_calibrated_model(reader: MonthReader, used: FittedModel, report: Report, month: str) -> FittedModel:
    """The model the report used, scaled by the bill's factors when there was a bill, as a new version."""
    if reader.models is None:
        raise ValueError("--write-model stores the model in Postgres: set DYNABASE_POSTGRES_DSN")
    calibration = report.calibration
    if calibration is None and reader.model_file is None:
        raise ValueError("--write-model needs --model FILE (an import) or a bill to calibrate the stored model")
    if calibration is not None and calibration.factor <= 0:
        raise ValueError(f"the bill's calibration factor for {month} is {calibration.factor}: nothing to write")
    coefficients = used.scaled(calibration.factor, report.memory_factor) if calibration else used.model
    source = f"{used.source}" + (f", calibrated to the {month} bill (CPU x{calibration.factor:.4f})"
                                 if calibration else "")
    return await reader.models.write(coefficients, used.tenant_factors, source)


# -- rendering ----------------------------------------------------------------------

COLUMNS = ("scope", "name", "tier", "queries", "vcpu_hours", "vcpu_hours_calibrated", "included_vcpu_hours",
           "overage_vcpu_hours", "base_fee_usd", "overage_usd", "revenue_usd", "cost_usd", "margin",
           "below_target", "warning")


def _margin_value(line: Line) -> float | None:
    margin = line.margin
    return None if margin is None or math.isinf(margin) else round(margin, 4)


def _row(scope: str, line: Line, warning: str) -> dict[str, Any]:
    return {
        "scope": scope, "name": line.name, "tier": line.tier, "queries": round(line.queries),
        "vcpu_hours": round(line.vcpu_hours, 4), "vcpu_hours_calibrated": round(line.vcpu_hours_calibrated, 4),
        "included_vcpu_hours": round(line.included_vcpu_hours, 4),
        "overage_vcpu_hours": round(line.overage_vcpu_hours, 4),
        # Cents as the invoice rounds them.
        "base_fee_usd": usd_cents(line.base_fee_usd) / 100, "overage_usd": usd_cents(line.overage_usd) / 100,
        "revenue_usd": usd_cents(line.revenue_usd) / 100,
        "cost_usd": None if line.cost_usd is None else round(line.cost_usd, 2),
        "margin": _margin_value(line), "below_target": line.below_target, "warning": warning,
    }


def rows(report: Report) -> list[dict[str, Any]]:
    warned = {w.tenant: w.level for w in report.warnings}
    out = [_row("tenant", line, warned.get(line.name, "")) for line in report.tenants]
    out += [_row("tier", line, "") for line in report.tiers]
    out.append(_row("total", report.total, ""))
    return out


def render_json(report: Report, month: str, source: str, notes: Sequence[str], model: FittedModel) -> str:
    calibration = report.calibration
    bill = report.bill
    doc = {
        "month": month, "source": source, "marginTarget": MARGIN_TARGET,
        "model": {"version": model.version, "source": model.source},
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


def render_table(report: Report, month: str, source: str, notes: Sequence[str], model: FittedModel) -> str:
    header = ("", "tenant / tier", "tier", "queries", "vCPU-h", "vCPU-h cal", "incl", "over", "base $",
              "overage $", "revenue $", "cost $", "margin", "warn")
    table: list[tuple[str, ...]] = [header]
    warned = {w.tenant: w.level for w in report.warnings}

    def cells(line: Line, name: str, warning: str) -> tuple[str, ...]:
        return ("!" if line.below_target else "", name, line.tier, f"{line.queries:.0f}",
                f"{line.vcpu_hours:.3f}", f"{line.vcpu_hours_calibrated:.3f}", f"{line.included_vcpu_hours:g}",
                f"{line.overage_vcpu_hours:.3f}", f"{line.base_fee_usd:.2f}", f"{line.overage_usd:.2f}",
                f"{line.revenue_usd:.2f}", "-" if line.cost_usd is None else f"{line.cost_usd:.2f}",
                _margin_text(line), f"{warning}%" if warning else "")

    table += [cells(line, line.name, warned.get(line.name, "")) for line in report.tenants]
    table += [cells(line, f"tier {line.name}", "") for line in report.tiers]
    table.append(cells(report.total, "all tenants", ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"usage {month} (from {source}, cost model version {model.version}: {model.source}); "
             f"'!' = gross margin under {MARGIN_TARGET:.0%}"]
    for row in table:
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    calibration = report.calibration
    if calibration is None:
        lines.append("no bill for this month: no calibration, cost or margin")
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
                     redis_url: str | None, postgres_dsn: str | None = None, railway_service: str | None = None,
                     kube_event: bool = False, write_model: bool = False) -> tuple[str, list[str]]:
    """The rendered report and the messages for stderr (notes, alerts). Raises ValueError
    for anything the caller must fix (month, manifests, files, URLs)."""
    from . import metrics
    from .bill import StaticBillSource

    month_hours(month)  # a bad --month fails before anything is read
    policies, tenants = load_declared(manifests)
    bill = await StaticBillSource(bill_path).measured(month) if bill_path else None
    if railway_service is not None:
        bill = await railway_bill(railway_service, month)
    async with open_month_reader(postgres_dsn=postgres_dsn, mongo_url=mongo_url, redis_url=redis_url,
                                 model_path=model_path) as reader:
        pricing = await reader.price(month, policies, tenants)
        report = build_report(pricing.tenants, bill)
        written = await write_calibrated_model(reader, pricing.model, report, month) if write_model else None
    notes = list(pricing.notes)
    if reader.models is None and model_path is None:
        notes.append("no DYNABASE_POSTGRES_DSN: priced with the built-in cost model, not the stored one")
    metrics.publish(report)
    if metrics_file is not None:
        metrics.write_textfile(metrics_file)
    messages = list(notes) if output_format != "table" else []
    if written is not None:
        messages.append(f"wrote cost model version {written.version} ({written.source})")
    if report.calibration is not None and report.calibration.alert:
        alert = (f"calibration for {month}: billed CPU / estimated CPU = {report.calibration.factor:.3f}, more "
                 "than 20% from 1; refit the model (bench.attribution) on the database host")
        messages.append(f"calibration alert: {alert}")
        if kube_event:
            from .alerts import post_event

            await post_event(next(iter(sorted(policies))), "CalibrationVariance", alert)
    if output_format == "json":
        return render_json(report, month, pricing.source, notes, pricing.model), messages
    if output_format == "csv":
        return render_csv(report), messages
    return render_table(report, month, pricing.source, notes, pricing.model), messages
