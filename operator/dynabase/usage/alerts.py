"""Alerts of the usage report as Kubernetes Events, so they show where operators look
(`kubectl get events`, the TierPolicy's `kubectl describe`) next to the metric."""

from __future__ import annotations

from dynabase.kubeapi import KubeApi
from dynabase.spec import API_VERSION

# TierPolicy is cluster-scoped; the apiserver keeps events about such objects in "default".
CLUSTER_EVENTS_NAMESPACE = "default"


async def post_event(policy: str, reason: str, message: str) -> None:
    """A Warning Event about the TierPolicy whose prices the report used."""
    async with KubeApi(connections=1) as api:
        await api.post_warning({"apiVersion": API_VERSION, "kind": "TierPolicy", "name": policy},
                               CLUSTER_EVENTS_NAMESPACE, reason, message, component="dynabase-usage")
