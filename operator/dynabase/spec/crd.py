"""Generate the CustomResourceDefinitions from the pydantic models.

Pydantic emits JSON Schema (with $ref, anyOf-null, exclusive bounds as numbers);
Kubernetes wants a *structural* OpenAPI v3 schema. ``structural`` does that
conversion. CEL rules arrive inside the JSON schema: a model's rules on its node
(``base.Model``), a duration's or size's format and a limit's range on the field.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from . import tenant
from .policy_status import TierPolicyStatus
from .resources import GROUP, VERSION
from .tenant import TenantDatabaseSpec, TenantDatabaseStatus
from .tier import TierPolicySpec

_KEEP_KEYS = {
    "type", "properties", "items", "additionalProperties", "required", "description",
    "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "format", "default", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-preserve-unknown-fields",
}


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")


def structural(schema: dict[str, Any], defs: dict[str, Any], *, keep_defaults: bool) -> dict[str, Any]:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = copy.deepcopy(schema)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        merged = {**defs[name], **node}
        return structural(merged, defs, keep_defaults=keep_defaults)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        inner = structural(options[0], defs, keep_defaults=keep_defaults)
        if node.get("description"):
            inner["description"] = node["description"]
        if keep_defaults and node.get("default") is not None:
            inner["default"] = node["default"]
        # The type's own rules (a duration's format) first, then the field's (its range).
        rules = [*inner.get("x-kubernetes-validations", []), *node.get("x-kubernetes-validations", [])]
        if rules:
            inner["x-kubernetes-validations"] = rules
        return inner
    if "exclusiveMinimum" in node:
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    out: dict[str, Any] = {
        k: v for k, v in node.items() if k in _KEEP_KEYS | {"exclusiveMinimum", "exclusiveMaximum"}
    }
    if not keep_defaults or out.get("default") is None:
        out.pop("default", None)
    if "properties" in out:
        out["type"] = "object"
        out["properties"] = {
            k: structural(v, defs, keep_defaults=keep_defaults) for k, v in out["properties"].items()
        }
        if out.get("additionalProperties") is False:
            del out["additionalProperties"]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(
            out["additionalProperties"], defs, keep_defaults=keep_defaults
        )
    if "items" in out:
        out["items"] = structural(out["items"], defs, keep_defaults=keep_defaults)
    if out.get("format") == "date-time":
        out["type"] = "string"
    return out


def _object_schema(model: type[BaseModel], *, keep_defaults: bool) -> dict[str, Any]:
    raw = _json_schema(model)
    defs = raw.pop("$defs", {})
    return structural(raw, defs, keep_defaults=keep_defaults)


def _status_schema(model: type[BaseModel], max_conditions: int) -> dict[str, Any]:
    status = _object_schema(model, keep_defaults=False)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["maxItems"] = max_conditions
    return status


_READY_COLUMN = {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    scope: str,
    spec_schema: dict[str, Any],
    status_schema: dict[str, Any] | None,
    columns: list[dict[str, Any]],
    root_rules: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec_schema,
    }
    if status_schema is not None:
        properties["status"] = status_schema
    root: dict[str, Any] = {"type": "object", "required": ["spec"], "properties": properties}
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "additionalPrinterColumns": columns,
    }
    if status_schema is not None:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["dynabase"],
            },
            "versions": [version],
        },
    }


def tier_policy_crd() -> dict[str, Any]:
    spec = _object_schema(TierPolicySpec, keep_defaults=False)
    return _crd(
        kind="TierPolicy",
        plural="tierpolicies",
        short_names=["tp", "tierpol"],
        scope="Cluster",
        spec_schema=spec,
        status_schema=_status_schema(TierPolicyStatus, max_conditions=8),
        columns=[
            _READY_COLUMN,
            {"name": "Tenants", "type": "integer", "jsonPath": ".status.tenants"},
            {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
             "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def tenant_database_crd() -> dict[str, Any]:
    spec = _object_schema(TenantDatabaseSpec, keep_defaults=True)
    # Renaming the database would orphan its data: the field is write-once.
    spec["properties"]["databaseName"]["x-kubernetes-validations"] = [
        {
            "rule": "self == oldSelf",
            "message": "databaseName is immutable: renaming would orphan the tenant's data; "
            "create a new TenantDatabase instead",
        }
    ]
    spec["x-kubernetes-validations"] = [
        *spec.get("x-kubernetes-validations", []),
        {
            "rule": "has(self.databaseName) == has(oldSelf.databaseName)",
            "message": "databaseName cannot be added or removed after creation (it would "
            "change the database in use); keep it as it was",
        },
    ]
    reserved = ", ".join(f"'{n}'" for n in tenant.RESERVED_NAMES)
    prefixes = "".join(
        f" && !self.metadata.name.startsWith('{p.replace('_', '-')}')" for p in tenant.RESERVED_PREFIXES
    )
    root_rules = [
        {
            "rule": "has(self.spec.databaseName) || (size(self.metadata.name) <= 63"
            " && self.metadata.name.matches('^[a-z][a-z0-9-]*$')"
            f" && !(self.metadata.name in [{reserved}]){prefixes})",
            "message": "metadata.name does not make a valid database name (at most 63 lower case "
            "letters, digits and -, not reserved such as postgres or pg-*); set "
            "spec.databaseName explicitly",
        }
    ]
    return _crd(
        kind="TenantDatabase",
        plural="tenantdatabases",
        short_names=["tdb", "tenantdb"],
        scope="Namespaced",
        spec_schema=spec,
        status_schema=_status_schema(TenantDatabaseStatus, max_conditions=16),
        columns=[
            {"name": "Org", "type": "string", "jsonPath": ".spec.orgId"},
            {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
            {"name": "Applied", "type": "string", "jsonPath": ".status.appliedTier", "priority": 1},
            {"name": "Pending", "type": "string", "jsonPath": ".status.pendingTier", "priority": 1},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            _READY_COLUMN,
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        root_rules=root_rules,
    )


def all_crds() -> list[dict[str, Any]]:
    return [tier_policy_crd(), tenant_database_crd()]
