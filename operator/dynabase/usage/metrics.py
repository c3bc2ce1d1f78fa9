"""Prometheus metrics of usage and calibration, in their own registry so that a
report run can write exactly these to a textfile-collector file."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

from dynabase.desired.margin import Report

REGISTRY = CollectorRegistry()
CALIBRATION_FACTOR = Gauge(
    "dynabase_calibration_factor", "Billed CPU / estimated CPU for the month last reported.", registry=REGISTRY
)
CALIBRATION_VARIANCE = Gauge(
    "dynabase_calibration_variance_ratio", "|calibration factor - 1|; above 0.2 the model needs refitting.",
    registry=REGISTRY,
)
INCLUDED_RATIO = Gauge(
    "dynabase_usage_included_ratio", "Billed vCPU-hours used / included in the tier (prorated).", ["tenant", "tier"],
    registry=REGISTRY,
)
WARNINGS = Counter(
    "dynabase_usage_warnings_total", "Tenants reported at 80 % or 100 % of their included vCPU-hours.",
    ["tenant", "level"], registry=REGISTRY,
)


def publish(report: Report) -> None:
    if report.calibration is not None:
        CALIBRATION_FACTOR.set(report.calibration.factor)
        CALIBRATION_VARIANCE.set(report.calibration.variance_ratio)
    INCLUDED_RATIO.clear()
    tiers = {line.name: line.tier for line in report.tenants}
    for tenant, ratio in report.included_ratio.items():
        INCLUDED_RATIO.labels(tenant=tenant, tier=tiers[tenant]).set(ratio)
    for warning in report.warnings:
        WARNINGS.labels(tenant=warning.tenant, level=warning.level).inc()


def write_textfile(path: Path) -> None:
    write_to_textfile(str(path), REGISTRY)
