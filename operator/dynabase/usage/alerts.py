"""Alerts of the usage report as Kubernetes Events, so they show where operators look
(`kubectl get events`, the TierPolicy's `kubectl describe`) next to the metric."""

from __future__ import annotations

import datetime as dt
import os
import uuid

from kubernetes import client, config

from dynabase.spec import API_VERSION


def _load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # KUBECONFIG as it is now: the client library reads it once, at import.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]


# TierPolicy is cluster-scoped; the apiserver keeps events about such objects in "default".
CLUSTER_EVENTS_NAMESPACE = "default"


def post_event(policy: str, reason: str, message: str) -> None:
    """A Warning Event about the TierPolicy whose prices the report used."""
    namespace = CLUSTER_EVENTS_NAMESPACE
    _load_config()
    now = dt.datetime.now(dt.UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"{policy}.{uuid.uuid4().hex[:12]}", namespace=namespace),
        involved_object=client.V1ObjectReference(api_version=API_VERSION, kind="TierPolicy", name=policy),
        reason=reason, message=message[:1024], type="Warning",
        first_timestamp=now, last_timestamp=now, count=1,
        source=client.V1EventSource(component="dynabase-usage"),
    )
    with client.ApiClient() as api:
        client.CoreV1Api(api).create_namespaced_event(namespace, event)
