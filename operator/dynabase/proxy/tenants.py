"""The proxy's configuration and its tenants: the published limits and pool ports (kept
current by the coordinator), the QPS budgets they make (one limiter per budget, shared by
an organization's databases), each tenant's state on this replica, and ending connections
over a lowered cap."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter

from dynabase.desired.drain import over_cap
from dynabase.desired.proxy import ProxyTenantLimits, QpsBudget, qps_budgets

from .admission import SharedLimiter
from .coordination import Coordination
from .metering import Usage

log = logging.getLogger(__name__)
DRAINED = Counter("dynabase_proxy_drained_connections_total",
                  "Client connections ended because a lowered cap left them over it.", ["tier"])


@dataclass
class ProxyConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 6543
    pgbouncer_host: str = "127.0.0.1"
    startup_timeout: float = 10.0
    pending_startups_per_tenant: int = 10
    sweep_interval: float = 0.1
    ssl_context: ssl.SSLContext | None = None
    # How other replicas reach this replica's PgBouncer to forward a CancelRequest
    # (default: pgbouncer_host, which is only right when they share it).
    pgbouncer_advertise_host: str | None = None
    busy_poll_us: int = 0  # spin this long after traffic instead of sleeping (see busypoll.py); 0 = off
    # Forward authenticated connections of tenants without a QPS limit in the kernel
    # (fastpath.py): "auto" where this machine allows it, "on" (required) or "off".
    kernel_splice: str = "off"


class Client(Protocol):
    """An authenticated client connection, as draining sees it (session.ClientConnection)."""

    opened: float  # monotonic

    @property
    def idle(self) -> bool: ...

    def fail(self, severity: str, sqlstate: str, message: str, hint: str | None = None) -> None: ...

    def limits_changed(self) -> None:
        """Its tenant's limits changed (a spliced connection may have to come back to Python)."""


@dataclass
class TenantState:
    limits: ProxyTenantLimits
    limiter: SharedLimiter | None  # None: no QPS limit
    usage: Usage
    budget: QpsBudget | None = None  # the budget ``limiter`` enforces
    pending: int = 0  # start-ups in progress
    clients: set[Client] = field(default_factory=set)  # authenticated connections
    wake_sent: bool = False  # this replica already announced that the Cold tenant is waking

    @property
    def active(self) -> int:
        return len(self.clients)

    def reconfigure(self, limits: ProxyTenantLimits, budget: QpsBudget | None, limiter: SharedLimiter | None) -> None:
        if not limits.cold:
            self.wake_sent = False
        self.limits = limits
        self.usage.tier = limits.tier
        self.budget = budget
        old, self.limiter = self.limiter, limiter
        if old is not None and old is not limiter:
            old.release_all()  # queries waiting on the old limiter ask the new one (or go: no limit)


class Changes:
    """Lets a caller wait for a condition on the proxy's state: woken when limits are applied,
    a client connection ends, or the link to the other replicas comes or goes."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()


class Tenants:
    """Tenant limits and pool ports as published (replaced wholesale by the coordinator), and
    the state of each tenant this replica has served."""

    def __init__(self, coordination: Coordination) -> None:
        self.coordination = coordination
        self._limits: dict[str, ProxyTenantLimits] = {}
        self.budgets: dict[str, QpsBudget] = {}  # by database; computed from ``limits``
        self.limiters: dict[str, SharedLimiter] = {}  # by budget owner: one per budget on this replica
        self._uneven: dict[str, QpsBudget] = {}  # organizations with uneven limits, as last logged
        self.pool_ports: dict[str, int] = {}
        self.replicas = 1
        self.states: dict[str, TenantState] = {}
        self.changes = Changes()
        self.meters: list[Callable[[], None]] = []  # bring usage counted elsewhere (the kernel) in

    def meter(self) -> None:
        """Before usage is read: every tenant's usage, counts made outside this process's Python included."""
        for meter in self.meters:
            meter()

    @property
    def limits(self) -> dict[str, ProxyTenantLimits]:
        return self._limits

    @limits.setter
    def limits(self, table: dict[str, ProxyTenantLimits]) -> None:
        """Replaced wholesale (the coordinator); the budgets follow. Tenants take them in ``get``."""
        self._limits = table
        self.budgets = qps_budgets(table)
        self._log_uneven()
        owners = {budget.owner for budget in self.budgets.values()}
        self.limiters = {owner: limiter for owner, limiter in self.limiters.items() if owner in owners}

    def _log_uneven(self) -> None:
        """Once per change: an organization whose databases have different QPS limits gets the
        most generous of them (desired.proxy.qps_budgets); say which."""
        uneven = {budget.owner: budget for budget in self.budgets.values() if budget.uneven}
        for owner, budget in uneven.items():
            if self._uneven.get(owner) != budget:
                log.info("databases of one organization have different QPS limits; they share the most generous",
                         extra={"budget": owner, "limits": budget.describe(), "from": budget.source})
        self._uneven = uneven

    def get(self, database: str) -> TenantState | None:
        """The tenant served as ``database``, on its current limits; None if there is none."""
        limits = self._limits.get(database)
        if limits is None:
            return None
        state = self.states.get(database)
        if state is None:
            state = self.states[database] = TenantState(limits, None, Usage(limits.tenant, limits.tier))
            self._configure(state, limits)
        elif state.limits is not limits or state.budget != self.budgets.get(database):
            self._configure(state, limits)
        return state

    def _configure(self, state: TenantState, limits: ProxyTenantLimits) -> None:
        budget = self.budgets.get(limits.database)
        state.reconfigure(limits, budget, None if budget is None else self._limiter(budget))

    def _limiter(self, budget: QpsBudget) -> SharedLimiter:
        """The limiter of this budget on this replica: the one its other databases use, retuned,
        or a new one when the rate or burst changed."""
        limiter = self.limiters.get(budget.owner)
        if limiter is not None and limiter.fits(budget):
            limiter.retune(budget)
            return limiter
        limiter = self.limiters[budget.owner] = SharedLimiter(budget, self.replicas, self.coordination)
        return limiter

    def set_replicas(self, replicas: int) -> None:
        self.replicas = max(1, replicas)
        for limiter in self.limiters.values():
            limiter.set_replicas(self.replicas)

    def release_waiters(self) -> None:
        for state in self.states.values():
            if state.limiter is not None:
                state.limiter.release_all()

    def applied(self, databases: list[str]) -> None:
        """New limits are in ``limits``: tenants take them now (also those whose organization's
        budget changed with another database's limits), connections over a lowered cap are ended
        (a suspended tenant's: all), and every connection of a changed tenant hears of it (one
        forwarded in the kernel is taken back when its tenant now has a QPS limit)."""
        named = set(databases)
        for database, state in list(self.states.items()):
            if database in named or state.budget != self.budgets.get(database):
                current = self.get(database)
                if current is None:
                    continue
                if database in named:
                    self._drain(database, current)
                for client in list(current.clients):
                    client.limits_changed()
        self.changes.notify()

    def _drain(self, database: str, state: TenantState) -> None:
        limits = state.limits
        cap = limits.max_connections if limits.enabled else 0
        ending = over_cap(state.clients, cap, idle=lambda c: c.idle, started=lambda c: c.opened)
        if not ending:
            return
        why = (f"tenant database {database} is suspended" if not limits.enabled else
               f"tenant database {database} is now on tier {limits.tier}, which allows "
               f"{limits.max_connections} connections; this one was over the new cap")
        for client in ending:
            client.fail("FATAL", "57P01", f"terminating connection: {why}",
                        hint=None if not limits.enabled else "reconnect, or upgrade the tier for more connections")
        DRAINED.labels(limits.tier).inc(len(ending))
        log.info("drained connections over the cap", extra={"database": database, "ended": len(ending), "cap": cap})

