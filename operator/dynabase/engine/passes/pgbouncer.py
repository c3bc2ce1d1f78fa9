"""PgBouncer: one pool per tier, tenants routed to their tier's pool.

The layout is one document shared by all tenants, published for the agents
that run PgBouncer; a pass observes it, patches it (or rebuilds it when it saw
all tenants), publishes it, and waits for the agents to confirm.
"""

from __future__ import annotations

import asyncio

from dynabase.backends.pgbouncer import PgBouncerBackend, PgBouncerObserved
from dynabase.desired.pgbouncer import PgBouncerDesired, TenantRoute, layout, plan_lines
from dynabase.keyspace import AgentReport

from ..conditions import Outcome
from .base import BackendPass, PassRun, Phase


class PgBouncerPass(BackendPass):
    backend = "pgbouncer"
    condition = "PgBouncerReady"

    def __init__(self, run: PassRun, pgbouncer: PgBouncerBackend, layout_lock: asyncio.Lock) -> None:
        super().__init__(run)
        self.pgbouncer = pgbouncer
        # Concurrent partial passes each patch the layout: read, patch and publish one at a time.
        self.layout_lock = layout_lock
        self.changed = False  # this pass published a new layout
        self.seq: int | None = None  # the publication the agents must confirm, once published

    async def step(self, phase: Phase) -> None:
        # Observe, plan and publish one pass at a time here, and one engine at a time anywhere
        # (operator shards share the layout); waiting for the agents needs no lock.
        async with self.layout_lock:
            try:
                async with self.pgbouncer.layout_lock():
                    await super().step(phase)
            except Exception as exc:  # Redis unreachable for the lock: this backend's condition, as observing
                self._planned = self._planned or False
                self.fail(self.affected(), "ObserveFailed", exc)
        if self.seq is not None:
            await self._confirm(self.seq)

    async def observe(self) -> None:
        self.observed: PgBouncerObserved = await self.pgbouncer.observe()

    def plan(self) -> None:
        run = self.run
        self.desired = layout(run.policies, [(r.tenant, r.decision) for r in run.results],
                              [r.tenant for r in run.deleted], self.observed.published, complete=run.complete)
        for result in run.everyone:
            lines = plan_lines(self.observed.published, self.desired, result.tenant.database_name)
            if lines:
                result.plans["pgbouncer"] = lines

    async def apply(self, phase: Phase) -> None:
        published = self.observed.published
        self.changed = published is None or published.version != self.desired.version
        if published is not None and not self.changed:
            self.seq = published.seq
            return
        try:
            self.seq = await self.pgbouncer.publish(self.desired, self.desired.version)
        except Exception as exc:
            self.fail(self.affected(), "PublishFailed", exc)

    async def _confirm(self, seq: int) -> None:
        agents, published = self.observed.agents, self.observed.published
        if (self.changed and published is not None and agents and all(a.seq >= published.seq for a in agents)
                and published.rendered_version == self.desired.rendered_version):
            seq, self.changed = published.seq, False  # nothing for the agents to do: their last report stands
        try:
            if self.changed or any(a.seq < seq for a in agents):
                agents = await self.pgbouncer.wait_confirmed(seq)
        except Exception as exc:
            self.fail(self.affected(), "PublishFailed", exc)
            return
        for result in self.affected():
            route = self.desired.routes[result.tenant.database_name]
            result.outcomes.append(pgbouncer_outcome(route, self.desired, seq, agents))


def pgbouncer_outcome(route: TenantRoute, desired: PgBouncerDesired, seq: int, agents: list[AgentReport]) -> Outcome:
    """What the agents' reports say about one tenant's pool."""
    condition = PgBouncerPass.condition
    if not agents:
        return Outcome(condition, False, "NoAgent", "no pgbouncer-agent has reported in the last 30s; is it running?")
    behind = [a.agent_id for a in agents if a.seq < seq]
    if behind:
        return Outcome(condition, False, "AgentPending", f"agents not yet on layout #{seq}: {', '.join(behind)}")
    for agent in agents:
        ok, why = agent.pool_ok(route.pool)
        if not ok:
            return Outcome(condition, False, "LiveMismatch", why)
    settings = route.settings or desired.pools[route.pool]
    return Outcome(condition, True, "Reconciled",
                   f"pool {route.pool}: pool_size {settings.pool_size}, mode {settings.pool_mode}")
