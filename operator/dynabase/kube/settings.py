"""Operator settings from flags and environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: list[str] = field(default_factory=list)  # empty = all namespaces
    drift_interval: float = 60.0
    concurrency: int = 8
    peering: str | None = None  # None = standalone (no peering objects needed)
    metrics_port: int = 9090
    liveness_port: int = 8080
    delete_retries: int = 5
    max_workers: int = 1000  # objects handled in parallel; 0 = unbounded (engine passes are capped anyway)
    api_connections: int = 16  # kopf's apiserver connections besides its watches (each ~300 KB of buffers)

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorSettings:
        env = os.environ
        values: dict[str, object] = {
            "namespaces": [n for n in env.get("DYNABASE_NAMESPACES", "").split(",") if n],
            "drift_interval": float(env.get("DYNABASE_DRIFT_INTERVAL", "60")),
            "concurrency": int(env.get("DYNABASE_CONCURRENCY", "8")),
            "peering": env.get("DYNABASE_PEERING") or None,
            "metrics_port": int(env.get("DYNABASE_METRICS_PORT", "9090")),
            "liveness_port": int(env.get("DYNABASE_LIVENESS_PORT", "8080")),
            "max_workers": int(env.get("DYNABASE_MAX_WORKERS", "1000")),
            "api_connections": int(env.get("DYNABASE_API_CONNECTIONS", "16")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
