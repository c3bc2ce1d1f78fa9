"""The one Kubernetes client: the apiserver calls of the operator, the webhooks and the usage alerts.

It speaks HTTP with aiohttp and logs in the way kopf does (the in-cluster
service account, else the kubeconfig), so the synchronous ``kubernetes``
package is not needed: its import, worker threads and connection pool cost the
operator most of its memory. Like kopf's own login, a kubeconfig's static
credentials are supported (token, client certificate, basic auth), not exec
plugins; in a cluster the service account is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import kopf

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(Exception):
    """A failed call: the method, the path and the apiserver's reason, never the request body."""

    def __init__(self, status: int, method: str, path: str, reason: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status} {reason}")
        self.status = status
        self.reason = reason


def connection_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster service account first, else the kubeconfig: the same order as kopf's own login."""
    account = kopf.login_with_service_account(settings=settings)
    if account is not None:
        return dataclasses.replace(account, server=in_cluster_server(account.server))
    info = kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig (KUBECONFIG, ~/.kube/config) "
                              "to reach the apiserver")
    return info


def in_cluster_server(default: str) -> str:
    """The apiserver address the kubelet gives every pod, as client-go's in-cluster config reads it.

    kopf's own login names https://kubernetes.default.svc, which needs cluster DNS; a host-network
    pod, or a cluster without kube-proxy and DNS, is reachable only through these variables.
    """
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return default
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def session(info: kopf.ConnectionInfo, connections: int) -> aiohttp.ClientSession:
    """An apiserver session holding at most ``connections`` connections.

    asyncio gives every TLS connection a 256 KB read buffer (plus OpenSSL's own);
    kopf's built-in session is unbounded and opens one connection per concurrent
    patch, which with 1,000 tenants arriving at once kept ~50 MB of buffers alive.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env,
    )


def kopf_login(settings: kopf.OperatorSettings, connections: int) -> kopf.AiohttpSession:
    """The operator's login handler: kopf's watches and patches over a bounded session."""
    info = connection_info(settings)
    return kopf.AiohttpSession(aiohttp_session=session(info, connections), server=info.server,
                               default_namespace=info.default_namespace, priority=info.priority)


class KubeApi:
    """JSON requests to the apiserver; logs in lazily and once more after a 401 (a rotated token)."""

    def __init__(self, settings: kopf.OperatorSettings | None = None, connections: int = 8) -> None:
        self._settings = settings or kopf.OperatorSettings()
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def _connect(self) -> aiohttp.ClientSession:
        info = connection_info(self._settings)
        self._server = info.server.rstrip("/")
        return session(info, self._connections)

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        for attempt in (1, 2):
            if self._session is None:
                self._session = self._connect()
            data = json.dumps(body) if body is not None else None
            async with self._session.request(method, self._server + path, data=data,
                                             headers={"Content-Type": content_type}) as response:
                if response.status == 401 and attempt == 1:
                    await self.close()
                    continue
                if response.status >= 400:
                    raise KubeApiError(response.status, method, path, await _reason(response))
                result: dict[str, Any] = await response.json()
                return result
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def watch(self, path: str, label_selector: str, resource_version: str, stop: asyncio.Event,
                    timeout: int = 300) -> AsyncIterator[dict[str, Any]]:
        """A collection's watch events after ``resource_version``, until the apiserver ends the stream
        (``timeout`` seconds) or ``stop`` is set. An expired version raises KubeApiError 410: list again."""
        if self._session is None:
            self._session = self._connect()
        params = {"watch": "1", "labelSelector": label_selector, "resourceVersion": resource_version,
                  "timeoutSeconds": str(timeout)}
        read_timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout + 30)
        async with self._session.get(self._server + path, params=params, timeout=read_timeout) as response:
            if response.status >= 400:
                raise KubeApiError(response.status, "WATCH", path, await _reason(response))
            async for line in response.content:
                if stop.is_set():
                    return
                event: dict[str, Any] = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise KubeApiError(int(status.get("code", 500)), "WATCH", path, str(status.get("reason", "")))
                yield event

    async def list_objects(self, group: str, version: str, plural: str,
                           namespaces: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Custom objects in these namespaces (empty: in all of them)."""
        base = f"/apis/{group}/{version}"
        paths = [f"{base}/namespaces/{ns}/{plural}" for ns in namespaces] or [f"{base}/{plural}"]
        return [item for path in paths for item in (await self.request("GET", path)).get("items", [])]

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, MERGE_PATCH)

    async def post_event(self, involved: dict[str, str], namespace: str, type_: str, reason: str, message: str,
                         component: str) -> None:
        """An Event (Normal or Warning) about ``involved`` (apiVersion, kind, name[, namespace, uid]),
        as kubectl describe shows. Usable from any task, unlike kopf.event (handlers only)."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event", "type": type_, "reason": reason, "message": message[:1024],
            "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": involved, "source": {"component": component},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)

    async def post_warning(self, involved: dict[str, str], namespace: str, reason: str, message: str,
                           component: str) -> None:
        await self.post_event(involved, namespace, "Warning", reason, message, component)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def _reason(response: aiohttp.ClientResponse) -> str:
    try:
        status = await response.json()
        return str(status.get("reason") or status.get("message") or response.reason)
    except (aiohttp.ContentTypeError, ValueError):
        return str(response.reason)
