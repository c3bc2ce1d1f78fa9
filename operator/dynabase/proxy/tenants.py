"""The proxy's configuration and its tenants: the published limits and pool ports (kept
current by the coordinator), each tenant's state on this replica, and ending connections
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
from dynabase.desired.proxy import ProxyTenantLimits

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
    pending: int = 0  # start-ups in progress
    clients: set[Client] = field(default_factory=set)  # authenticated connections
    wake_sent: bool = False  # this replica already announced that the Cold tenant is waking

    @property
    def active(self) -> int:
        return len(self.clients)

    def reconfigure(self, limits: ProxyTenantLimits, replicas: int, coordination: Coordination) -> None:
        if not limits.cold:
            self.wake_sent = False
        self.limits = limits
        self.usage.tier = limits.tier
        old = self.limiter
        if limits.qps is None:
            self.limiter = None
        elif old is None or not old.fits(limits):
            self.limiter = SharedLimiter(limits, replicas, coordination)
        else:
            old.retune(limits)
            return
        if old is not None:
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
        self.limits: dict[str, ProxyTenantLimits] = {}
        self.pool_ports: dict[str, int] = {}
        self.replicas = 1
        self.states: dict[str, TenantState] = {}
        self.changes = Changes()
        self.meters: list[Callable[[], None]] = []  # bring usage counted elsewhere (the kernel) in

    def meter(self) -> None:
        """Before usage is read: every tenant's usage, counts made outside this process's Python included."""
        for meter in self.meters:
            meter()

    def get(self, database: str) -> TenantState | None:
        """The tenant served as ``database``, on its current limits; None if there is none."""
        limits = self.limits.get(database)
        if limits is None:
            return None
        state = self.states.get(database)
        if state is None:
            state = self.states[database] = TenantState(limits, None, Usage(limits.tenant, limits.tier))
            state.reconfigure(limits, self.replicas, self.coordination)
        elif state.limits is not limits:
            state.reconfigure(limits, self.replicas, self.coordination)
        return state

    def set_replicas(self, replicas: int) -> None:
        self.replicas = max(1, replicas)
        for state in self.states.values():
            if state.limiter is not None:
                state.limiter.set_replicas(self.replicas)

    def release_waiters(self) -> None:
        for state in self.states.values():
            if state.limiter is not None:
                state.limiter.release_all()

    def applied(self, databases: list[str]) -> None:
        """New limits are in ``limits``: tenants take them now, and connections over a lowered
        cap are ended (a suspended tenant's: all)."""
        for database in databases:
            if database in self.states:
                state = self.get(database)
                if state is not None:
                    self._drain(database, state)
                    for client in list(state.clients):
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
