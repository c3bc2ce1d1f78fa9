"""Operator settings; `dynabase operator` fills them from its flags and their variables (cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .shards import UNSHARDED, Shard


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: list[str] = field(default_factory=list)  # empty = all namespaces
    drift_interval: float = 60.0
    concurrency: int = 8
    peering: str | None = None  # None = standalone (no peering objects needed)
    peering_lifetime: int = 60  # seconds a silent active replica is trusted before a standby takes over
    shard: Shard = UNSHARDED  # only tenants labelled dynabase.io/shard=N (see shards.py)
    metrics_port: int = 9090
    liveness_port: int = 8080
    delete_retries: int = 5
    max_workers: int = 1000  # objects handled in parallel; 0 = unbounded (engine passes are capped anyway)
    api_connections: int = 16  # kopf's apiserver connections besides its watches (each ~300 KB of buffers)
