"""`dynabase proxy`: per-tenant connection caps, queries per second and metering in
front of PgBouncer, on the Postgres wire protocol.

The modules, from the top: server (this: listening, the timeout sweep), session (a
connection's life), scanner (the forwarding hot paths and holding throttled queries),
tenants (configuration, limits, tenant state, draining), admission (the QPS decision
and the leases behind it), and below them limiter, metering, wire and coordination
(what a replica asks of the others; coordinator.py answers through Redis).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter

from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.settings import cache_dir

from . import fastpath
from .busypoll import BusyPoll
from .coordination import Coordination, LocalOnly, Target
from .session import COLD_STARTS, ClientConnection
from .tenants import ProxyConfig, Tenants

__all__ = ["COLD_STARTS", "Proxy", "ProxyConfig"]

log = logging.getLogger(__name__)
SWEEP_ERRORS = Counter("dynabase_proxy_sweep_errors",
                       "Unexpected errors checking a connection's statement and idle-in-transaction limits.")


class Proxy:
    def __init__(self, config: ProxyConfig, tenants: Tenants | None = None) -> None:
        """``tenants``: the registry a coordinator keeps current (coordinator.Coordinator.tenants);
        without one the proxy is on its own (coordination.LocalOnly) and its limits are set directly."""
        self.config = config
        self.tenants = tenants if tenants is not None else Tenants(LocalOnly())
        self.coordination: Coordination = self.tenants.coordination
        self.connections: set[ClientConnection] = set()
        self.cancel_targets: dict[tuple[int, int], Target] = {}
        self.poke = BusyPoll(config.busy_poll_us).poke if config.busy_poll_us else None
        self.kernel = fastpath.start(config.kernel_splice, cache_dir())
        if self.kernel is not None:
            self.tenants.meters.append(self.kernel.meter)
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._sweep_logged = float("-inf")  # when a failed timeout check was last logged

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Fire-and-forget with a reference kept, so the task is not collected mid-flight."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self), self.config.listen_host, self.config.listen_port, backlog=1024
        )
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self.server:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        if self.kernel is not None:
            self.tenants.meters.remove(self.kernel.meter)
            self.kernel.close()
            self.kernel = None

    @property
    def port(self) -> int:
        assert isinstance(self.server, asyncio.Server)
        return int(self.server.sockets[0].getsockname()[1])

    async def serves(self, database: str, check: Callable[[ProxyTenantLimits], bool]) -> ProxyTenantLimits:
        """The limits of ``database`` once the proxy routes it under limits that pass ``check`` (any
        connections they end have been told): an event to await instead of sleeping for Redis."""
        found: list[ProxyTenantLimits] = []

        def routed() -> bool:
            limits = self.tenants.limits.get(database)
            if limits is None or limits.pool not in self.tenants.pool_ports or not check(limits):
                return False
            found.append(limits)
            return True

        await self.tenants.changes.until(routed)
        return found[-1]

    async def _sweep(self) -> None:
        """One periodic pass instead of a timer per query: statement and idle-in-transaction limits."""
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Check every connection's timeouts; returns how many checks failed. A failure is a bug:
        it is counted and logged (at most once a minute, lest it flood the log), and the other
        connections are still checked."""
        failed = 0
        for conn in list(self.connections):
            try:
                conn.check_timeouts(now)
            except Exception:
                failed += 1
                if now - self._sweep_logged >= 60.0:
                    self._sweep_logged = now
                    log.exception("checking a connection's timeouts failed")
        if failed:
            SWEEP_ERRORS.inc(failed)
        return failed
