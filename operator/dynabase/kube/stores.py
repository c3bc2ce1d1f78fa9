"""Kubernetes-backed stores: tenant passwords in Secrets, status in the status subresource.

The kubernetes client is synchronous; calls run in a thread so the operator's
event loop keeps serving other tenants.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dynabase.spec import GROUP, VERSION, TenantDatabase, TenantDatabaseStatus

PLURAL = "tenantdatabases"
GENERATED_SUFFIX = "-dynabase-password"


def secret_name(tenant: TenantDatabase) -> tuple[str, str]:
    ref = tenant.spec.password_secret_ref
    if ref is not None:
        return ref.name, ref.key
    return f"{tenant.name}{GENERATED_SUFFIX}", "password"


class KubeSecretStore:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        name, key = secret_name(tenant)
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, tenant.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = (secret.data or {}).get(key)
        return base64.b64decode(data).decode() if data else None

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        """A generated Secret is owned by the TenantDatabase, so it goes with it."""
        name, key = secret_name(tenant)
        owner = client.V1OwnerReference(
            api_version=f"{GROUP}/{VERSION}", kind="TenantDatabase", name=tenant.name,
            uid=str(tenant.metadata.uid or ""), controller=True, block_owner_deletion=False,
        )
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name, namespace=tenant.namespace,
                labels={"app.kubernetes.io/managed-by": "dynabase", "dynabase.io/tenant": tenant.name},
                owner_references=[owner] if tenant.metadata.uid else None,
            ),
            type="Opaque",
            string_data={key: password},
        )
        try:
            await asyncio.to_thread(self.core.create_namespaced_secret, tenant.namespace, body)
            return password
        except ApiException as exc:
            if exc.status != 409:
                raise
        # Created meanwhile (a concurrent pass, or the user): theirs wins, never overwrite it.
        existing = await self.get_password(tenant)
        if existing is not None:
            return existing
        patch = {"stringData": {key: password}}  # the Secret exists without our key: add it
        await asyncio.to_thread(self.core.patch_namespaced_secret, name, tenant.namespace, patch)
        return password


def status_patch(status: TenantDatabaseStatus) -> dict[str, Any]:
    """Merge patch of the whole status; cleared fields are sent as null to remove them."""
    full = status.model_dump(mode="json", by_alias=True)
    return {"status": {k: v for k, v in full.items()}}


class KubeStatusStore:
    """Status comes from the bodies kopf hands us; writes go to the status subresource."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
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
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, PLURAL, name, status_patch(status),
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to record
                raise
        self.known[key] = status

    def forget(self, key: str) -> None:
        self.known.pop(key, None)
