"""MongoDB: the org record the platform's apps read, built from effective limits. Pure."""

from __future__ import annotations

from typing import Any

from .effective import EffectiveLimits

ORG_DB = "dynabase"
ORGS = "organizations"
USAGE = "tenantUsage"


def org_document(tenant_key: str, org_id: str, database: str, limits: EffectiveLimits,
                 policy: str, policy_generation: int | None) -> dict[str, Any]:
    """Everything but updatedAt, which is set only when something else changed."""
    def size(value: Any) -> Any:
        return None if value is None else value.text

    return {
        "_id": tenant_key,
        "orgId": org_id,
        "database": database,
        "tier": limits.tier,
        "tierPolicy": policy,
        "policyGeneration": policy_generation,
        "limits": {
            "postgres": {"connectionLimit": limits.postgres.connection_limit,
                         "statementTimeoutMs": limits.postgres.statement_timeout.milliseconds
                         if limits.postgres.statement_timeout else None},
            "proxy": {"maxConnections": limits.proxy.max_connections, "qps": limits.proxy.qps,
                      "burst": limits.proxy.burst},
            "redis": {"maxKeys": limits.redis.max_keys, "maxMemory": size(limits.redis.max_memory)},
            "mongo": {"maxConnections": limits.mongo.max_connections},
            "billing": {"baseFeeUSD": limits.billing.base_fee_usd,
                        "includedVcpuHours": limits.billing.included_vcpu_hours,
                        "overagePerVcpuHourUSD": limits.billing.overage_per_vcpu_hour_usd},
        },
    }


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
