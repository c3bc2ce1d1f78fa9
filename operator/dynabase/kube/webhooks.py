"""The operator's notification endpoints: the URL from the TenantDatabase, the signing secret from a
Secret in its namespace (``spec.notifications.secretRef``, default ``<name>-dynabase-webhook``, key
``secret``). Both are read when a notification is sent, from the apiserver rather than the watch's
cache: a replica whose watches are paused by peering still finds them, and a notification queued for a
tenant deleted since is cancelled, not sent."""

from __future__ import annotations

import base64

from dynabase.events.delivery import Endpoint, Endpoints, EndpointUnavailable
from dynabase.kubeapi import KubeApi, KubeApiError
from dynabase.spec import GROUP, VERSION

SECRET_SUFFIX = "-dynabase-webhook"


def kube_endpoints(api: KubeApi) -> Endpoints:
    async def endpoint(key: str) -> Endpoint | None:
        namespace, _, name = key.partition("/")
        try:
            body = await api.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/tenantdatabases/{name}")
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise EndpointUnavailable(f"cannot read TenantDatabase {key}: HTTP {exc.status}") from None
        notifications = (body.get("spec") or {}).get("notifications")
        if not notifications:
            return None
        ref = notifications.get("secretRef") or {}
        secret_name, secret_key = ref.get("name") or f"{name}{SECRET_SUFFIX}", ref.get("key") or "secret"
        try:
            secret = await api.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{secret_name}")
        except KubeApiError as exc:
            raise EndpointUnavailable(f"cannot read Secret {namespace}/{secret_name}: HTTP {exc.status}; create it "
                                      f"with the signing secret under key {secret_key!r}") from None
        data = (secret.get("data") or {}).get(secret_key)
        if not data:
            raise EndpointUnavailable(f"Secret {namespace}/{secret_name} has no key {secret_key!r}: put the signing "
                                      "secret there")
        return Endpoint(str(notifications["url"]), base64.b64decode(data).decode().strip())

    return endpoint
