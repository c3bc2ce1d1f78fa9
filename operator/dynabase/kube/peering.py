"""Active and standby replicas through kopf's peering: one peering object per shard.

kopf pauses an operator while a live peer of the same peering object has a
higher priority, and pauses *every* peer whose priorities tie. So each replica
takes its start time as its priority, earliest highest: the replica that was
there first stays active, a restarted or added one stands by, and when the
active one stops (it withdraws from the peering on SIGTERM; after a crash its
entry expires after ``peering_lifetime`` seconds) the next oldest takes over.

The peering object is created when missing: without it kopf keeps the operator
paused, silently.
"""

from __future__ import annotations

import logging
import os
import time

from dynabase.kubeapi import KubeApi, KubeApiError

log = logging.getLogger(__name__)
PEERING_GROUP = "/apis/kopf.dev/v1"


def peering_priority(started: float | None = None) -> int:
    """Earlier start, higher priority; microseconds and the process id make a tie practically impossible."""
    micros = int((time.time() if started is None else started) * 1_000_000)
    return -(micros * 1000 + os.getpid() % 1000)


async def ensure_peering(api: KubeApi, name: str, namespaces: list[str]) -> None:
    """The ClusterKopfPeering (all namespaces) or a KopfPeering per namespace, created if absent."""
    targets: list[tuple[str, str, str | None]]
    if namespaces:
        targets = [(f"{PEERING_GROUP}/namespaces/{ns}/kopfpeerings", "KopfPeering", ns) for ns in namespaces]
    else:
        targets = [(f"{PEERING_GROUP}/clusterkopfpeerings", "ClusterKopfPeering", None)]
    for path, kind, namespace in targets:
        metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
        try:
            await api.request("POST", path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": metadata})
            log.warning("created the peering object", extra={"kind": kind, "peering": name})
        except KubeApiError as exc:
            if exc.status == 409:
                continue  # there already
            if exc.status == 404:
                raise SystemExit(f"dynabase operator: --peering {name} needs kopf's {kind} resource "
                                 "(its CustomResourceDefinition: manifests/peering.yaml for ClusterKopfPeering)"
                                 ) from None
            raise
