"""The order the backends are changed in, written as data.

Limits fall at the proxy first, so clients are held back before anything
behind it shrinks, and rise there last, once the backends behind it can take
the load. Postgres limits rise before PgBouncer's pools grow and fall after
they shrink, so PgBouncer never holds more server connections than a role may
open. Postgres is observed before anything changes; every other pass observes
at its first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .base import BackendPass, Phase


@dataclass(frozen=True)
class Step:
    backend: str
    phase: Phase


ORDER: tuple[Step, ...] = (
    Step("postgres", Phase.OBSERVE),
    Step("proxy", Phase.FALLING),
    Step("postgres", Phase.RISING),
    Step("pgbouncer", Phase.ALL),
    Step("postgres", Phase.FALLING),
    Step("redis", Phase.ALL),
    Step("mongo", Phase.ALL),
    Step("railway", Phase.ALL),
    Step("proxy", Phase.RISING),
)


async def run_in_order(passes: Mapping[str, BackendPass], order: tuple[Step, ...] = ORDER) -> None:
    """Each step of ``order`` whose backend is configured; a dry run only observes and plans."""
    unknown = {p for p in passes} - {s.backend for s in order}
    if unknown:
        raise ValueError(f"passes {sorted(unknown)} have no step in the order")
    for step in order:
        backend_pass = passes.get(step.backend)
        if backend_pass is not None:
            await backend_pass.step(step.phase)
