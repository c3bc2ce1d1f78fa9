"""MongoDB: the org record the platform's apps read, built from effective limits. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

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


class MeteredHour(Protocol):
    """One proxy replica's counters for one tenant and hour (dynabase.keyspace.UsageSample)."""

    @property
    def tenant(self) -> str: ...
    @property
    def tier(self) -> str | None: ...
    @property
    def counters(self) -> Mapping[str, float]: ...


def rollup(hour: int, samples: Iterable[MeteredHour]) -> dict[str, dict[str, Any]]:
    """Sum the replicas' cumulative per-hour counters into one document per tenant."""
    out: dict[str, dict[str, Any]] = {}
    for sample in samples:
        doc = out.setdefault(sample.tenant, {"_id": f"{sample.tenant}|{hour}", "tenant": sample.tenant,
                                             "hour": hour, "tier": sample.tier})
        for key, value in sample.counters.items():
            doc[key] = round(doc.get(key, 0) + value, 6)
    return out
