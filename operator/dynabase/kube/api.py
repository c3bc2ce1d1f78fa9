"""The few apiserver calls the operator makes itself, over aiohttp with kopf's credentials.

kopf already speaks to the apiserver with aiohttp; the stores' Secret and status calls
use the same library and the same login (kubeconfig or in-cluster service account)
instead of the synchronous kubernetes client, whose import, worker threads and
connection pool cost the operator process most of its memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import aiohttp
import kopf

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(Exception):
    """A failed call: the method, the path and the apiserver's reason, never the request body."""

    def __init__(self, status: int, method: str, path: str, reason: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status} {reason}")
        self.status = status


def connection_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster service account first, else the kubeconfig: the same order as kopf's own login."""
    account = kopf.login_with_service_account(settings=settings)
    if account is not None:
        return dataclasses.replace(account, server=in_cluster_server(account.server))
    info = kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig to reach the apiserver")
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
    info = connection_info(settings)
    return kopf.AiohttpSession(aiohttp_session=session(info, connections), server=info.server,
                               default_namespace=info.default_namespace, priority=info.priority)


class KubeApi:
    def __init__(self, settings: kopf.OperatorSettings, connections: int = 8) -> None:
        self._settings = settings
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
                    # A rotated service account token: log in again once.
                    await self.close()
                    continue
                if response.status >= 400:
                    raise KubeApiError(response.status, method, path, await _reason(response))
                result: dict[str, Any] = await response.json()
                return result
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _reason(response: aiohttp.ClientResponse) -> str:
    try:
        status = await response.json()
        return str(status.get("reason") or status.get("message") or response.reason)
    except (aiohttp.ContentTypeError, ValueError):
        return str(response.reason)
