"""Kubernetes-backed stores: tenant passwords in Secrets, status in the status subresource.

Calls go through `KubeApi` (aiohttp, on the operator's event loop): no threads.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from dynabase.kubeapi import MERGE_PATCH, KubeApi, KubeApiError
from dynabase.spec import GROUP, VERSION, TenantDatabase, TenantDatabaseStatus

PLURAL = "tenantdatabases"
GENERATED_SUFFIX = "-dynabase-password"
TENANT_LABEL = "dynabase.io/tenant"  # on generated Secrets: the tenant's name
_LIST_CHUNK = 100  # tenant names per label selector (the request line stays a few KB)


def secret_name(tenant: TenantDatabase) -> tuple[str, str]:
    ref = tenant.spec.password_secret_ref
    if ref is not None:
        return ref.name, ref.key
    return f"{tenant.name}{GENERATED_SUFFIX}", "password"


def _secrets(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets"


class KubeSecretStore:
    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        name, key = secret_name(tenant)
        try:
            secret = await self.api.request("GET", f"{_secrets(tenant.namespace)}/{name}")
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        data = (secret.get("data") or {}).get(key)
        return base64.b64decode(data).decode() if data else None

    async def get_passwords(self, tenants: Sequence[TenantDatabase]) -> dict[str, str | None]:
        """Generated Secrets by label, a LIST per namespace and 100 tenants instead of a GET each.

        Only what the LIST finds is answered: a Secret made by hand (a restored password, a
        ``passwordSecretRef``) carries no label, so those tenants are read one by one.
        """
        wanted: dict[str, dict[str, TenantDatabase]] = {}
        for tenant in tenants:
            if tenant.spec.password_secret_ref is None and _label_value(tenant.name):
                wanted.setdefault(tenant.namespace, {})[tenant.name] = tenant
        found: dict[str, str | None] = {}

        async def list_chunk(namespace: str, names: list[str]) -> None:
            selector = quote(f"{TENANT_LABEL} in ({','.join(names)})", safe="")
            listed = await self.api.request("GET", f"{_secrets(namespace)}?labelSelector={selector}")
            for secret in listed.get("items", []):
                tenant = wanted[namespace].get(str(secret["metadata"].get("labels", {}).get(TENANT_LABEL)))
                if tenant is None or secret["metadata"]["name"] != secret_name(tenant)[0]:
                    continue
                data = (secret.get("data") or {}).get("password")
                if data:
                    found[tenant.key] = base64.b64decode(data).decode()

        chunks = []
        for namespace, by_name in wanted.items():
            names = sorted(by_name)
            chunks += [list_chunk(namespace, names[i:i + _LIST_CHUNK]) for i in range(0, len(names), _LIST_CHUNK)]
        await asyncio.gather(*chunks)
        return found

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        """A generated Secret is owned by the TenantDatabase, so it goes with it."""
        name, key = secret_name(tenant)
        metadata: dict[str, Any] = {
            "name": name, "namespace": tenant.namespace,
            "labels": {"app.kubernetes.io/managed-by": "dynabase", TENANT_LABEL: tenant.name},
        }
        if tenant.metadata.uid:
            metadata["ownerReferences"] = [{
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantDatabase", "name": tenant.name,
                "uid": str(tenant.metadata.uid), "controller": True, "blockOwnerDeletion": False,
            }]
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
                "stringData": {key: password}}
        try:
            await self.api.request("POST", _secrets(tenant.namespace), body)
            return password
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        # Created meanwhile (a concurrent pass, or the user): theirs wins, never overwrite it.
        existing = await self.get_password(tenant)
        if existing is not None:
            return existing
        patch = {"stringData": {key: password}}  # the Secret exists without our key: add it
        await self.api.request("PATCH", f"{_secrets(tenant.namespace)}/{name}", patch, MERGE_PATCH)
        return password

    def restore_hint(self, tenant: TenantDatabase) -> str:
        name, key = secret_name(tenant)
        return f"put it in Secret {tenant.namespace}/{name} under key {key!r}"


def _label_value(name: str) -> bool:
    """Whether a tenant's name fits a label value (names may be longer than labels allow)."""
    return len(name) <= 63


def status_patch(status: TenantDatabaseStatus) -> dict[str, Any]:
    """Merge patch of the whole status; cleared fields are sent as null to remove them."""
    full = status.model_dump(mode="json", by_alias=True)
    return {"status": {k: v for k, v in full.items()}}


class KubeStatusStore:
    """Status comes from the bodies kopf hands us; writes go to the status subresource."""

    def __init__(self, api: KubeApi, field_manager: str = "dynabase-operator") -> None:
        self.api = api
        self.field_manager = field_manager  # the apiserver records it as the writer of the status fields
        self.known: dict[str, TenantDatabaseStatus] = {}
        self.writes = 0

    def remember(self, tenant: TenantDatabase) -> None:
        if tenant.status is not None:
            self.known[tenant.key] = tenant.status

    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        return {k: self.known[k] for k in keys if k in self.known}

    async def save(self, key: str, status: TenantDatabaseStatus) -> None:
        namespace, name = key.split("/", 1)
        self.writes += 1
        try:
            await self.api.request(
                "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
                f"?fieldManager={self.field_manager}", status_patch(status), MERGE_PATCH)
        except KubeApiError as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to record
                raise
        self.known[key] = status

    def forget(self, key: str) -> None:
        self.known.pop(key, None)
