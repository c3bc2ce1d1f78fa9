"""Gives tenants that no shard selects the label of the shard their name falls to.

Each operator labels only the tenants that fall to its own shard, conditioned on
the resourceVersion it read, so a tenant gets one label, once; the shard's own
watch (server-side filtered) then picks it up as a new object. A sign-up that
sets the label itself skips this hop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from dynabase.kubeapi import MERGE_PATCH, KubeApi, KubeApiError
from dynabase.spec import GROUP, VERSION

from .shards import SHARD_LABEL, Shard

log = logging.getLogger(__name__)
TENANTS = "tenantdatabases"


class Labeller:
    """Gives unlabelled tenants of this shard their label; the shard's watch then picks them up."""

    def __init__(self, api: KubeApi, shard: Shard, namespaces: list[str]) -> None:
        self.api, self.shard, self.namespaces = api, shard, namespaces
        self.labelled = 0

    def _paths(self) -> list[str]:
        base = f"/apis/{GROUP}/{VERSION}"
        return [f"{base}/namespaces/{ns}/{TENANTS}" for ns in self.namespaces] or [f"{base}/{TENANTS}"]

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._follow(path, stop) for path in self._paths()))

    async def _follow(self, path: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                listed = await self.api.request("GET", f"{path}?labelSelector={_quote(self.shard.unassigned)}")
                for item in listed.get("items", []):
                    await self.label(item)
                version = str(listed.get("metadata", {}).get("resourceVersion", ""))
                async for event in self.api.watch(path, self.shard.unassigned, version, stop):
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        await self.label(event["object"])
            except (KubeApiError, OSError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("shard labeller: retrying", extra={"error": str(exc)})
                await asyncio.sleep(2)

    async def label(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        namespace, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
        if meta.get("deletionTimestamp") or not self.shard.owns(namespace, name):
            return False
        # Conditional on what was read: if anyone changed the object meanwhile, the next event decides.
        patch = {"metadata": {"labels": {SHARD_LABEL: str(self.shard.index)},
                              "resourceVersion": meta.get("resourceVersion")}}
        try:
            await self.api.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{TENANTS}/{name}",
                                   patch, MERGE_PATCH)
        except KubeApiError as exc:
            if exc.status in (404, 409):  # deleted, or changed meanwhile (the next event comes)
                return False
            raise
        self.labelled += 1
        return True


def _quote(selector: str) -> str:
    return quote(selector, safe="")
