"""One client connection's life: the start-up packet (TLS, CancelRequest or a tenant's
start-up), connecting to the tenant's PgBouncer pool, authentication passing through,
the connection cap counted once authenticated, the timeouts a tenant cannot switch off,
and the end. Once READY the scanners (scanner.py) forward."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from prometheus_client import Histogram

from . import wire
from .coordination import Coordination, Target
from .fastpath import FastPath, Splice
from .handover import Handover
from .kernel import Conn
from .scanner import AUTH, CLOSED, CONNECTING, READY, STARTUP, SyncPoint, Upstream
from .tenants import ProxyConfig, Tenants

COLD_STARTS = Histogram(
    "dynabase_proxy_cold_start_seconds", "Start-up to ReadyForQuery for connections that woke a Cold tenant.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class Host(Protocol):
    """What a connection uses of the proxy that accepted it (server.Proxy)."""

    config: ProxyConfig
    tenants: Tenants
    coordination: Coordination
    connections: set[ClientConnection]
    cancel_targets: dict[tuple[int, int], Target]  # backend keys this replica handed out
    poke: Callable[[], None] | None
    kernel: FastPath | None  # forwards spliced connections (fastpath.py); None: all in Python

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class ClientConnection(Handover):
    cancel_target: Target = ("127.0.0.1", 0)  # the PgBouncer serving this connection

    def __init__(self, proxy: Host) -> None:
        super().__init__(proxy.poke)
        self.proxy = proxy
        self.buffer = bytearray()  # before READY: bytes not yet handled
        self.counted_pending = False
        self.counted_active = False
        self.startup_timer: asyncio.TimerHandle | None = None
        self.backend_key: tuple[int, int] | None = None
        self.opened = 0.0  # monotonic, once authenticated
        self.cold_start = 0.0  # when this connection's start-up found its tenant Cold

    # -- connection lifecycle ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state == READY:  # back from the kernel (handover.py): paused until it has resumed
            transport.pause_reading()  # type: ignore[attr-defined]
            self.transport = transport  # type: ignore[assignment]
            return
        self.transport = transport  # type: ignore[assignment]
        self.proxy.connections.add(self)
        loop = asyncio.get_running_loop()
        self.startup_timer = loop.call_later(self.proxy.config.startup_timeout, self._startup_timeout)

    def _startup_timeout(self) -> None:
        if self.state in (STARTUP, CONNECTING, AUTH):
            self.fail("FATAL", "08P01", "no valid start-up within "
                      f"{self.proxy.config.startup_timeout:.0f}s; closing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.proxy.connections.discard(self)
        self.end_splice()
        if self.startup_timer:
            self.startup_timer.cancel()
        if self.hold_timer:
            self.hold_timer.cancel()
        tenant = self.tenant
        if tenant is not None:
            if self.counted_pending:
                tenant.pending -= 1
                self.counted_pending = False
            if self.counted_active:
                tenant.clients.discard(self)
                self.counted_active = False
            if tenant.limiter is not None:
                with contextlib.suppress(ValueError):
                    tenant.limiter.waiters.remove(self)
        if self.backend_key:
            self.proxy.cancel_targets.pop(self.backend_key, None)
            self.proxy.coordination.forget_cancel(self.backend_key)
        if self.upstream and self.upstream.transport:
            self.upstream.transport.close()
        if self.transport:
            self.transport.close()
        self.proxy.tenants.changes.notify()

    def fail(self, severity: str, sqlstate: str, message: str, hint: str | None = None) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(wire.error_response(severity, sqlstate, message, hint=hint))
        self.close()

    @property
    def idle(self) -> bool:
        kernel = self.kernel_counters()
        if kernel is not None:
            return Splice.idle(kernel)
        return self.tx_status == b"I" and not self.syncs and self.held is None

    def fastpath(self) -> FastPath | None:
        return self.proxy.kernel

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.proxy.spawn(coro)

    # -- client -> proxy --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.poke is not None:
            self.poke()
        if self.state == READY:
            tenant = self.tenant
            assert tenant is not None
            tenant.usage.bytes_in += len(data)  # here: client_data also replays held bytes
            self.client_data(data)
        elif self.state == STARTUP:
            self.buffer += data
            self._startup()
        elif self.state in (CONNECTING, AUTH):
            if self.state == AUTH and self.upstream and self.upstream.transport:
                self.upstream.transport.write(data)  # SASL/password messages pass through
            else:
                self.buffer += data

    def _startup(self) -> None:
        try:
            packet = wire.parse_startup(bytes(self.buffer))
        except wire.ProtocolError as exc:
            self.fail("FATAL", "08P01", f"invalid start-up packet: {exc}")
            return
        if packet is None:
            return
        raw = bytes(self.buffer[: packet.length])
        del self.buffer[: packet.length]
        assert self.transport is not None
        if packet.kind == "ssl":
            if self.proxy.config.ssl_context is not None:
                self.transport.write(b"S")
                self.proxy.spawn(self._start_tls())
                return
            self.transport.write(b"N")
        elif packet.kind == "gssenc":
            self.transport.write(b"N")
        elif packet.kind == "cancel":
            self.proxy.spawn(self._forward_cancel(packet.cancel_pid, packet.cancel_key))
            return
        else:
            self._begin(packet.params, raw)
            return
        if self.buffer:
            self._startup()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.proxy.config.ssl_context is not None
        try:
            self.transport = await loop.start_tls(
                self.transport, self, self.proxy.config.ssl_context, server_side=True
            )
        except (OSError, ssl.SSLError):
            self.close()

    async def _forward_cancel(self, pid: int, key: int) -> None:
        """Route a CancelRequest to the PgBouncer that issued that key, wherever it came in:
        this replica's own keys first, then those the other replicas published. The client
        is answered the same way (closed at once, nothing sent) whether the key exists or not."""
        target = self.proxy.cancel_targets.get((pid, key))
        self.close()
        if target is None:
            target = await self.proxy.coordination.find_cancel((pid, key))
        if target is None:
            return
        await send_cancel(target, pid, key)

    def _begin(self, params: dict[str, str], startup_bytes: bytes, *, looked_up: bool = False) -> None:
        database = params.get("database") or params["user"]
        tenant = self.proxy.tenants.get(database)
        if tenant is None and not looked_up:
            # A tenant published a moment ago (a sign-up) may not have reached this replica over
            # pub/sub yet: ask Redis once before refusing. Bytes that arrive meanwhile are buffered.
            self.state = CONNECTING
            self.proxy.spawn(self._look_up(params, startup_bytes, database))
            return
        if tenant is None:
            self.fail("FATAL", "3D000", f'database "{database}" is not a tenant database served by this proxy',
                      hint="check the database name in your connection string")
            return
        limits = tenant.limits
        if not limits.enabled:
            self.fail("FATAL", "57P03", f'tenant database "{database}" is suspended')
            return
        if tenant.pending >= self.proxy.config.pending_startups_per_tenant:
            tenant.usage.rejected_connections += 1
            self.fail("FATAL", "53300", f"too many connection attempts in progress for {database}")
            return
        if limits.cold:
            # Nothing blocks a Cold tenant here: its sessions were ended, so the connection
            # opens fresh ones. The engine is told at once so the tenant is marked awake.
            self.cold_start = time.monotonic()
            if not tenant.wake_sent:
                tenant.wake_sent = True
                self.proxy.coordination.wake(database)
        port = self.proxy.tenants.pool_ports.get(limits.pool)
        if port is None:
            self.fail("FATAL", "57P03", f"no PgBouncer pool {limits.pool} is running for {database} yet",
                      hint="retry in a moment")
            return
        self.tenant = tenant
        tenant.pending += 1
        self.counted_pending = True
        self.state = CONNECTING
        self.proxy.spawn(self._connect(port, startup_bytes))

    async def _look_up(self, params: dict[str, str], startup_bytes: bytes, database: str) -> None:
        await self.proxy.coordination.look_up(database)
        if self.state != CLOSED:
            self._begin(params, startup_bytes, looked_up=True)

    async def _connect(self, port: int, startup: bytes) -> None:
        loop = asyncio.get_running_loop()
        host = self.proxy.config.pgbouncer_host
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self), host, port)
        except OSError as exc:
            self.fail("FATAL", "08006", f"cannot reach the tenant's pool: {exc.strerror}")
            return
        if self.state == CLOSED:
            if upstream.transport:
                upstream.transport.close()
            return
        self.upstream = upstream
        self.cancel_target = (host, port)
        self.state = AUTH
        assert upstream.transport is not None
        upstream.transport.write(startup + bytes(self.buffer))
        self.buffer.clear()

    # -- authentication ------------------------------------------------------------------------

    def _auth_data(self, data: bytes) -> None:
        """Start-up replies: watch for BackendKeyData and the first ReadyForQuery."""
        assert self.transport is not None and self.tenant is not None
        self.buffer += data
        i = 0
        buf = self.buffer
        while len(buf) - i >= 5:
            kind = buf[i]
            length = int.from_bytes(buf[i + 1 : i + 5], "big")
            if len(buf) - i < 1 + length:
                break
            if kind == wire.BACKEND_KEY_DATA and length == 12:
                self.backend_key = wire.backend_key(buf, i)
                self.proxy.cancel_targets[self.backend_key] = self.cancel_target
                config = self.proxy.config
                host = config.pgbouncer_advertise_host or config.pgbouncer_host
                self.proxy.coordination.publish_cancel(self.backend_key, (host, self.cancel_target[1]))
            elif kind == wire.READY_FOR_QUERY:
                self.transport.write(bytes(buf[:i]))
                ready = bytes(buf[i : i + 1 + length])
                rest = bytes(buf[i + 1 + length :])
                self.buffer.clear()
                self._authenticated(ready, rest)
                return
            i += 1 + length
        if i:
            self.transport.write(bytes(buf[:i]))
            del buf[:i]

    def _authenticated(self, ready: bytes, rest: bytes) -> None:
        """Counted only now, so clients that fail to authenticate never use up a tenant's slots."""
        tenant = self.tenant
        assert tenant is not None and self.transport is not None
        tenant.pending -= 1
        self.counted_pending = False
        limits = tenant.limits
        if tenant.active >= limits.max_connections:
            tenant.usage.rejected_connections += 1
            self.fail(
                "FATAL", "53300",
                f"too many connections for tenant database {limits.database}: tier {limits.tier} allows "
                f"{limits.max_connections}",
                hint="close idle connections, use a pool, or upgrade to a higher tier",
            )
            return
        tenant.clients.add(self)
        tenant.usage.connections += 1
        self.counted_active = True
        self.opened = time.monotonic()
        if self.cold_start:
            COLD_STARTS.observe(self.opened - self.cold_start)
        self.state = READY
        if self.startup_timer:
            self.startup_timer.cancel()
        if rest or not self.spliceable(tenant) or not self.try_splice(ready):
            self.transport.write(ready)
            if rest:
                self.server_data(rest)

    # -- timeouts the tenant cannot switch off ---------------------------------------------

    def check_timeouts(self, now: float) -> None:
        if self.state != READY or self.tenant is None:
            return
        limits = self.tenant.limits
        if self.in_kernel:  # spliced, or being taken back (the scanners check again once it is)
            if self.splice is not None and not self.splice.taken and (
                    limits.statement_timeout_ms or limits.idle_in_transaction_ms):
                self._check_spliced(now, self.splice.counters())
            return
        if limits.statement_timeout_ms and self.syncs and self.cancel_sent_for is None:
            point: SyncPoint = self.syncs[0]
            if point.synthetic is None and (now - point.started) * 1000 > limits.statement_timeout_ms:
                self.cancel_sent_for = point
                self.proxy.spawn(self._cancel_upstream())
        if (limits.idle_in_transaction_ms and self.idle_in_tx_since and not self.syncs
                and (now - self.idle_in_tx_since) * 1000 > limits.idle_in_transaction_ms):
            self._idle_in_transaction_too_long()

    def _check_spliced(self, now: float, kernel: Conn) -> None:
        """The same limits, from the kernel's counters. An overdue statement is taken back
        first, so the next sweep cancels it and rewords the error as above."""
        assert self.tenant is not None
        limits = self.tenant.limits
        running = Splice.running_since(kernel)
        if limits.statement_timeout_ms and running is not None and (now - running) * 1000 > limits.statement_timeout_ms:
            self.take_back()
            return
        idle = Splice.idle_in_transaction_since(kernel)
        if limits.idle_in_transaction_ms and idle is not None and (now - idle) * 1000 > limits.idle_in_transaction_ms:
            self._idle_in_transaction_too_long()

    def _idle_in_transaction_too_long(self) -> None:
        assert self.tenant is not None
        limits = self.tenant.limits
        self.fail("FATAL", "25P03", f"terminating connection: idle in transaction longer than the tier "
                                    f"{limits.tier} limit of {limits.idle_in_transaction_ms} ms")

    async def _cancel_upstream(self) -> None:
        if self.backend_key is None:
            return
        await send_cancel(self.cancel_target, *self.backend_key)

    def _reword_cancel(self, message: bytes) -> bytes | None:
        fields = wire.error_fields(message)
        if fields.get("C") != "57014" or self.tenant is None:
            return None
        limits = self.tenant.limits
        self.tenant.usage.statement_timeouts += 1
        return wire.error_response(
            fields.get("S", "ERROR"), "57014",
            f"canceling statement due to statement timeout: tier {limits.tier} allows "
            f"{limits.statement_timeout_ms} ms per statement",
            hint="make the query faster or upgrade to a higher tier",
        )


async def send_cancel(target: Target, pid: int, key: int) -> None:
    """Send a CancelRequest and wait for PgBouncer to close the connection.

    PgBouncer 1.18 crashes ("bad client state") when the cancelling client hangs
    up before it has finished forwarding the cancel, so we let it close first.
    """
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        reader, writer = await asyncio.open_connection(*target)
        try:
            writer.write(wire.cancel_request(pid, key))
            await writer.drain()
            await asyncio.wait_for(reader.read(), timeout=5)
        finally:
            writer.close()
