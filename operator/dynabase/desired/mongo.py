"""MongoDB: the org record the platform's apps read, built from effective limits. Pure."""

from __future__ import annotations

from typing import Any

from dynabase.spec.limits import ALL_FIELDS
from dynabase.spec.units import ByteSize, Duration

from .effective import EffectiveLimits

ORG_DB = "dynabase"
ORGS = "organizations"
USAGE = "tenantUsage"


def org_document(tenant_key: str, org_id: str, database: str, limits: EffectiveLimits,
                 policy: str, policy_generation: int | None) -> dict[str, Any]:
    """Everything but updatedAt, which is set only when something else changed."""
    return {
        "_id": tenant_key,
        "orgId": org_id,
        "database": database,
        "tier": limits.tier,
        "tierPolicy": policy,
        "policyGeneration": policy_generation,
        "limits": org_limits(limits),
    }


def org_limits(limits: EffectiveLimits) -> dict[str, dict[str, Any]]:
    """The limits declared with an org key, by section: durations in milliseconds, sizes as written."""
    out: dict[str, dict[str, Any]] = {}
    for declared in ALL_FIELDS:
        if declared.limit.org is not None:
            out.setdefault(declared.section, {})[declared.limit.org] = _org_value(declared.read(limits))
    return out


def _org_value(value: object) -> object:
    if isinstance(value, Duration):
        return value.milliseconds
    if isinstance(value, ByteSize):
        return value.text
    return value


def org_changed(current: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    if current is None:
        return True
    return {k: v for k, v in current.items() if k != "updatedAt"} != wanted


def rollup(hour: int, fields: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Sum the replicas' cumulative per-hour counters into one document per tenant."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for name, text in fields.items():
        tenant, _, _replica = name.rpartition("|")
        values = json.loads(text)
        doc = out.setdefault(tenant, {"_id": f"{tenant}|{hour}", "tenant": tenant, "hour": hour,
                                      "tier": values.get("tier")})
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                doc[key] = round(doc.get(key, 0) + value, 6)
    return out
