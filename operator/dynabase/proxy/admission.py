"""Admission: whether a tenant's query may go now, wait, or is refused (53400).

A SharedLimiter is one QPS budget on this replica: a database's own, or its organization's,
which that organization's databases on this replica share (desired.proxy.qps_budgets says
which). It owns everything about the budget the replicas share: the leased slots
(limiter.TenantLimiter), the lease in flight, when the shared schedule has room again, the
queries waiting for either, and how long a query may wait at all (its queue budget). While
the replicas cannot reach each other it admits from this replica's local share instead,
adding no latency.

The connection's side (holding the rest of its stream while a query waits, and replaying
it) is in scanner.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from dynabase.desired.proxy import ProxyTenantLimits, QpsBudget

from . import wire
from .coordination import Coordination
from .limiter import TenantLimiter, lease_ahead, lease_reply

log = logging.getLogger(__name__)

# admit(): no slot yet. The query waits in `waiters` until the limiter releases it, when a
# lease answers or the shared schedule has room again; it then asks again.
HOLD = -1.0


class Waiter(Protocol):
    hold_deadline: float  # monotonic time after which the query would rather be refused

    def release(self, reject: bool = False) -> None: ...


def queue_budget(budget: QpsBudget) -> float:
    """Seconds a query may wait for a slot: its tier's queueTimeout when throttled, none when refused."""
    return budget.queue_timeout_ms / 1000 if budget.over_limit == "throttle" else 0.0


def rate_limit_error(limits: ProxyTenantLimits, budget: QpsBudget | None) -> bytes:
    """53400 for a query of ``limits``' database over ``budget`` (None: the limit was lifted
    while the query waited; its own limits say what it was)."""
    tier, qps = (budget.tier, budget.qps) if budget is not None else (limits.tier, limits.qps)
    retry = 1.0 / qps if qps else 1.0
    shared = f" for all databases of organization {budget.org_id} together" if budget and budget.org_id else ""
    return wire.error_response(
        "ERROR", "53400",
        f"query rate limit exceeded for tenant database {limits.database}: tier {tier} allows {qps} queries per "
        f"second{shared}",
        hint=f"retry after {retry * 1000:.0f} ms, slow down, or upgrade to a higher tier",
    )


class SharedLimiter:
    __slots__ = (
        "_retry",
        "ahead",
        "budget",
        "burst",
        "coordination",
        "lease_task",
        "leasing",
        "next_free",
        "owner",
        "qps",
        "schedule",
        "waiters",
    )

    def __init__(self, budget: QpsBudget, replicas: int, coordination: Coordination) -> None:
        self.owner = budget.owner
        self.qps, self.burst = budget.qps, budget.burst
        self.schedule = TenantLimiter(budget.qps, budget.burst, replicas)
        self.coordination = coordination
        self.budget = self.ahead = 0.0
        self.retune(budget)
        self.leasing = False
        self.next_free = 0.0  # when the shared schedule has room again (from the last short lease)
        self.waiters: list[Waiter] = []
        self.lease_task: asyncio.Task[None] | None = None  # the lease in flight
        self._retry: asyncio.TimerHandle | None = None

    def fits(self, budget: QpsBudget) -> bool:
        """Whether this budget keeps this limiter's schedule (the same owner, rate and burst)."""
        return (budget.owner, budget.qps, budget.burst) == (self.owner, self.qps, self.burst)

    def retune(self, budget: QpsBudget) -> None:
        self.budget = queue_budget(budget)
        self.ahead = lease_ahead(self.budget)

    # -- the hot path ------------------------------------------------------------------------

    def admit(self, now: float, first_hold: float) -> float | None:
        """For a query that first waited at ``first_hold`` (0.0: it has not): 0.0 = go now,
        > 0 = a slot is reserved for it, go after that long, HOLD = wait in ``waiters``,
        None = refuse."""
        max_wait = (first_hold or now) + self.budget - now
        if max_wait < 0.0:
            max_wait = 0.0
        schedule = self.schedule
        if not self.coordination.connected:
            return schedule.local.reserve(now, max_wait)
        wait = schedule.take(now, max_wait)
        if wait is None:
            return self._no_slot(now, max_wait)
        if not self.leasing and now >= self.next_free and schedule.low(now):
            self.lease()  # the next batch, before this one runs out
        return wait

    def _no_slot(self, now: float, max_wait: float) -> float | None:
        """No leased slot falls due in time: refuse, wait for the schedule, or ask for a lease."""
        if now + max_wait < self.next_free or self.schedule.holds(now):
            # The schedule is full for longer than the query may wait, or slots are held
            # but fall due too late: a new lease would only come later still.
            return None
        if now < self.next_free:
            self._retry_after(self.next_free - now)
        else:
            self.lease()
        return HOLD

    # -- leases --------------------------------------------------------------------------------

    def lease(self) -> None:
        """Ask for the next batch of slots, unless a lease is already on its way."""
        if self.leasing:
            return
        self.leasing = True
        self.lease_task = asyncio.get_running_loop().create_task(self._lease())
        self.lease_task.add_done_callback(self._lease_done)

    async def _lease(self) -> None:
        schedule = self.schedule
        sent, wall = time.monotonic(), time.time()
        want = schedule.lease_size(sent)
        try:
            reply = await self.coordination.lease(self.owner, schedule.lanes,
                                                  schedule.lease_args(int(wall * 1_000_000), want, self.ahead))
        finally:
            self.leasing = False
        if reply is None:  # out of reach: the waiting queries decide again, from the local share
            self.release_all()
            return
        grants, wait = lease_reply(reply, sent)  # slots placed on this clock
        now = time.monotonic()
        self.next_free = schedule.settle(grants, wait, want, now, self.ahead)
        # Held queries decide again: with slots each finds its own (and waits for it, or is
        # refused if it falls due too late); without, they wait for the schedule to have room.
        retry = self.next_free - now
        if grants or retry <= 0:
            self.release_all()
            return
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if now + retry > waiter.hold_deadline:
                waiter.release(reject=True)
            else:
                self.waiters.append(waiter)
        if self.waiters:
            self._retry_after(retry)

    def _lease_done(self, task: asyncio.Task[None]) -> None:
        self.lease_task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("QPS lease failed", exc_info=task.exception(), extra={"budget": self.owner})
            self.release_all()  # none may wait for an answer that will not come

    # -- waiting queries ------------------------------------------------------------------------

    def _retry_after(self, delay: float) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(delay, self.release_all)

    def release_all(self) -> None:
        """Every waiting query decides again (limits changed, a lease answered, or the replicas
        lost each other)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.release()

    def set_replicas(self, replicas: int) -> None:
        self.schedule.set_replicas(replicas)
