"""`dynabase proxy`: per-tenant connection caps, queries per second and metering
in front of PgBouncer, on the Postgres wire protocol.

After start-up the proxy forwards bytes as they arrive. It reads only the
5-byte message headers (type + length) to find Query/Execute/Sync on the way
in and ReadyForQuery on the way out; message bodies are never copied or parsed,
except an ErrorResponse it must reword after cancelling a statement itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from dynabase.desired.proxy import ProxyTenantLimits

from . import wire
from .busypoll import BusyPoll
from .limiter import TenantLimiter
from .metering import Usage

log = logging.getLogger(__name__)
DRAINED = Counter("dynabase_proxy_drained_connections_total",
                  "Client connections ended because a lowered cap left them over it.", ["tier"])
COLD_STARTS = Histogram(
    "dynabase_proxy_cold_start_seconds", "Start-up to ReadyForQuery for connections that woke a Cold tenant.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

MAX_MESSAGE = 1 << 30  # Postgres' own limit for a single message
_HEADER = struct.Struct("!BI").unpack_from  # type byte + length, without slicing the buffer
_monotonic = time.monotonic  # one global lookup on the hot path instead of two
# Message types: Query, Execute, Sync, Terminate, FunctionCall (client); ReadyForQuery,
# ErrorResponse, BackendKeyData (server). 'E' is Execute one way and ErrorResponse the other.
Q, E, S, X, F, Z, K = (ord(c) for c in "QESXFZK")
ERR = E
STARTUP, CONNECTING, AUTH, READY, CLOSED = range(5)


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


@dataclass
class TenantState:
    limits: ProxyTenantLimits
    limiter: TenantLimiter | None
    usage: Usage
    active: int = 0
    pending: int = 0
    waiters: list[ClientConnection] = field(default_factory=list)
    wake_sent: bool = False  # this replica already announced that the Cold tenant is waking

    def reconfigure(self, limits: ProxyTenantLimits, replicas: int) -> None:
        if not limits.cold:
            self.wake_sent = False
        self.limits = limits
        if limits.qps is None:
            self.limiter = None
        elif self.limiter is None or (self.limiter.qps, self.limiter.burst) != (limits.qps, limits.burst):
            self.limiter = TenantLimiter(limits.qps, limits.burst or limits.qps, replicas)


@dataclass(slots=True)
class SyncPoint:
    """One expected ReadyForQuery: from a Query, a Sync, or a rejected Query (synthetic)."""

    started: float
    inject: bytes | None = None  # an ErrorResponse to send just before the server's ReadyForQuery
    synthetic: bytes | None = None  # a rejected simple Query: ErrorResponse, sent with our own RFQ
    counted: int = 0  # queries (Query/Execute) this point completes


class Router:
    """Tenant limits and pool ports; filled and kept current by the Redis watcher."""

    def __init__(self) -> None:
        self.limits: dict[str, ProxyTenantLimits] = {}
        self.pool_ports: dict[str, int] = {}
        self.replicas = 1


class Proxy:
    def __init__(self, config: ProxyConfig, router: Router) -> None:
        self.config = config
        self.router = router
        self.tenants: dict[str, TenantState] = {}
        self.connections: set[ClientConnection] = set()
        self.cancel_targets: dict[tuple[int, int], tuple[str, int]] = {}
        # Backend keys shared with the other replicas (set by the coordinator): publish at
        # authentication, forget at close, and find a key another replica handed out.
        self.publish_cancel: Callable[[tuple[int, int], tuple[str, int]], None] | None = None
        self.forget_cancel: Callable[[tuple[int, int]], None] | None = None
        self.find_cancel: Callable[[int, int], Awaitable[tuple[str, int] | None]] | None = None
        self.lease: Callable[[TenantState], None] | None = None  # set by the Redis coordinator
        self.wake: Callable[[str], None] | None = None  # announces a Cold tenant's wake-up (coordinator)
        self.redis_ok = False
        # Called on every read when busy polling is on; None (one check per read) when off.
        self.poke: Callable[[], None] | None = BusyPoll(config.busy_poll_us).poke if config.busy_poll_us else None
        self.server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._routing_changed = asyncio.Event()  # set, then replaced, by routing_changed()

    def spawn(self, coro: Any) -> None:
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

    @property
    def port(self) -> int:
        assert isinstance(self.server, asyncio.Server)
        return int(self.server.sockets[0].getsockname()[1])

    def tenant(self, database: str) -> TenantState | None:
        limits = self.router.limits.get(database)
        if limits is None:
            return None
        state = self.tenants.get(database)
        if state is None:
            state = TenantState(limits, None, Usage(limits.tenant, limits.tier))
            self.tenants[database] = state
        if state.limits is not limits:
            state.reconfigure(limits, self.router.replicas)
            state.usage.tier = limits.tier
        elif state.limiter is None and limits.qps is not None:
            state.reconfigure(limits, self.router.replicas)
        return state

    def limits_updated(self, databases: list[str]) -> None:
        """New limits arrived: connections over a lowered cap are ended (suspended tenants: all)."""
        for database in databases:
            if database not in self.tenants:
                continue
            state = self.tenant(database)
            if state is None:
                continue
            limits = state.limits
            cap = limits.max_connections if limits.enabled else 0
            if state.active <= cap:
                continue
            mine = [c for c in self.connections if c.tenant is state and c.counted_active]
            # Idle ones first (nothing in flight, not in a transaction), then the newest.
            mine.sort(key=lambda c: (not c.idle, -c.opened))
            excess = state.active - cap
            why = (f"tenant database {database} is suspended" if not limits.enabled else
                   f"tenant database {database} is now on tier {limits.tier}, which allows "
                   f"{limits.max_connections} connections; this one was over the new cap")
            for conn in mine[:excess]:
                conn.fail("FATAL", "57P01", f"terminating connection: {why}",
                          hint=None if not limits.enabled else "reconnect, or upgrade the tier for more connections")
            DRAINED.labels(limits.tier).inc(min(excess, len(mine)))
            log.info("drained connections over the cap",
                     extra={"database": database, "ended": min(excess, len(mine)), "cap": cap})
        self.routing_changed()

    def routing_changed(self) -> None:
        """New limits are applied or pool ports known: wakes whoever awaits serves()."""
        self._routing_changed.set()
        self._routing_changed = asyncio.Event()

    async def serves(self, database: str, check: Callable[[ProxyTenantLimits], bool]) -> ProxyTenantLimits:
        """The limits of ``database`` once the proxy routes it under limits that pass ``check`` (any
        connections they end have been told): an event to await instead of sleeping for Redis."""
        while True:
            changed = self._routing_changed
            limits = self.router.limits.get(database)
            if limits is not None and limits.pool in self.router.pool_ports and check(limits):
                return limits
            await changed.wait()

    async def _sweep(self) -> None:
        """One periodic pass instead of a timer per query: statement and idle-in-transaction limits."""
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            now = time.monotonic()
            for conn in list(self.connections):
                with contextlib.suppress(Exception):
                    conn.check_timeouts(now)


class Upstream(asyncio.Protocol):
    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.poke = client.proxy.poke
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.poke is not None:
            self.poke()
        self.client.server_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_client()

    def resume_writing(self) -> None:
        self.client.resume_client()


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.poke = proxy.poke
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.state = STARTUP
        self.buffer = bytearray()
        self.tenant: TenantState | None = None
        self.counted_pending = False
        self.counted_active = False
        self.startup_timer: asyncio.TimerHandle | None = None
        self.backend_key: tuple[int, int] | None = None
        # client -> server scanning
        self.c_remaining = 0
        self.c_skip = 0
        self.c_partial = b""
        self.skip_to_sync: bytes | None = None  # error to report at the next Sync
        self.batch_started = 0.0
        self.batch_queries = 0
        self.held: bytes | None = None
        self.hold_deadline = 0.0
        self.hold_timer: asyncio.TimerHandle | None = None
        self.force_reject = False
        self.reserved = False  # a local GCRA slot was reserved for the held query
        self.first_hold = 0.0  # when the held query first had to wait (queueTimeout counts from here)
        # server -> client scanning
        self.s_remaining = 0
        self.s_partial = b""
        self.syncs: collections.deque[SyncPoint] = collections.deque()
        self.opened = 0.0
        self.cold_start = 0.0  # when this connection's start-up found its tenant Cold
        self.tx_status = b"I"
        self.idle_in_tx_since = 0.0
        self.cancel_sent_for: SyncPoint | None = None

    # -- connection lifecycle ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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
                tenant.active -= 1
                self.counted_active = False
            with contextlib.suppress(ValueError):
                tenant.waiters.remove(self)
        if self.backend_key:
            self.proxy.cancel_targets.pop(self.backend_key, None)
            if self.proxy.forget_cancel is not None:
                self.proxy.forget_cancel(self.backend_key)
        if self.upstream and self.upstream.transport:
            self.upstream.transport.close()
        if self.transport:
            self.transport.close()

    def fail(self, severity: str, sqlstate: str, message: str, hint: str | None = None) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(wire.error_response(severity, sqlstate, message, hint=hint))
        self.close()

    def upstream_lost(self) -> None:
        self.close()

    @property
    def idle(self) -> bool:
        return self.tx_status == b"I" and not self.syncs and self.held is None

    def pause_client(self) -> None:
        if self.transport:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport and self.held is None:
            self.transport.resume_reading()

    def pause_writing(self) -> None:  # the client reads slowly: stop reading the server
        if self.upstream and self.upstream.transport:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream and self.upstream.transport:
            self.upstream.transport.resume_reading()

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
        if target is None and self.proxy.find_cancel is not None:
            target = await self.proxy.find_cancel(pid, key)
        if target is None:
            return
        await send_cancel(target, pid, key)

    def _begin(self, params: dict[str, str], startup_bytes: bytes) -> None:
        database = params.get("database") or params["user"]
        tenant = self.proxy.tenant(database)
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
            if not tenant.wake_sent and self.proxy.wake is not None:
                tenant.wake_sent = True
                self.proxy.wake(database)
        port = self.proxy.router.pool_ports.get(limits.pool)
        if port is None:
            self.fail("FATAL", "57P03", f"no PgBouncer pool {limits.pool} is running for {database} yet",
                      hint="retry in a moment")
            return
        self.tenant = tenant
        tenant.pending += 1
        self.counted_pending = True
        self.state = CONNECTING
        self.proxy.spawn(self._connect(port, startup_bytes))

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

    # -- the forwarding hot paths -----------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Forward client bytes, reading only message headers: a message is forwarded,
        held (throttled: this and all later bytes wait) or skipped (rejected up to Sync)."""
        tenant = self.tenant
        assert tenant is not None
        if self.c_partial:
            data = self.c_partial + data
            self.c_partial = b""
        self.idle_in_tx_since = 0.0
        n = len(data)
        i = start = 0  # i: next header; start: first byte not yet forwarded or skipped
        if self.c_remaining:  # the rest of a message forwarded in an earlier read
            i = self.c_remaining
            self.c_remaining = i - n if i > n else 0
        elif self.c_skip:  # the rest of a skipped message
            i = self.c_skip
            start = i if i < n else n
            self.c_skip = i - n if i > n else 0
        out: list[bytes] = []
        syncs = self.syncs
        while i < n:
            if n - i < 5:
                if start < i:
                    out.append(data[start:i])
                self.c_partial = data[i:]
                start = n
                break
            kind, length = _HEADER(data, i)
            if length < 4 or length > MAX_MESSAGE:
                self.fail("FATAL", "08P01", "invalid message length from client")
                return
            end = i + 1 + length
            forward = True
            if self.skip_to_sync is not None:
                if kind == S:
                    syncs.append(SyncPoint(self.batch_started or _monotonic(), self.skip_to_sync))
                    self.skip_to_sync = None
                    self.batch_started = 0.0
                else:
                    forward = False
            elif kind in (Q, E):
                verdict = self._admit(tenant) if tenant.limiter is not None or self.force_reject else 0.0
                if verdict is None:
                    self._reject(tenant, kind)
                    forward = False
                elif verdict != 0.0:
                    if start < i:
                        out.append(data[start:i])
                    self._hold(data[i:], verdict)
                    start = n
                    break
                else:
                    tenant.usage.queries += 1
                    if kind == Q:
                        syncs.append(SyncPoint(_monotonic(), None, None, 1))
                    else:
                        if not self.batch_started:
                            self.batch_started = _monotonic()
                        self.batch_queries += 1
            elif kind == S:
                syncs.append(SyncPoint(self.batch_started or _monotonic(), None, None, self.batch_queries))
                self.batch_started = 0.0
                self.batch_queries = 0
            elif kind == F:
                syncs.append(SyncPoint(_monotonic()))
            if forward:
                if end > n:
                    self.c_remaining = end - n
                    break
            else:
                if start < i:
                    out.append(data[start:i])
                start = end if end < n else n
                if end > n:
                    self.c_skip = end - n
                    break
            i = end
        if start < n and not self.c_partial:
            out.append(data[start:] if start else data)
        if out and self.upstream and self.upstream.transport:
            if len(out) == 1:
                self.upstream.transport.write(out[0])
            else:
                self.upstream.transport.writelines(out)

    def server_data(self, data: bytes) -> None:
        """Forward server bytes, reading only headers: ReadyForQuery completes a SyncPoint
        (query time, transaction status, a queued error first), an ErrorResponse for our own
        statement-timeout cancel is reworded; everything else passes untouched."""
        if self.state == AUTH:
            self._auth_data(data)
            return
        tenant = self.tenant
        assert tenant is not None and self.transport is not None
        tenant.usage.bytes_out += len(data)
        if self.s_partial:
            data = self.s_partial + data
            self.s_partial = b""
        n = len(data)
        i = start = 0
        if self.s_remaining:  # the rest of a message begun in an earlier read
            i = self.s_remaining
            self.s_remaining = i - n if i > n else 0
        out: list[bytes] = []
        syncs = self.syncs
        while i < n:
            if n - i < 6 and (n - i < 5 or data[i] == Z):
                self.s_partial = data[i:]
                n = i
                break
            kind, length = _HEADER(data, i)
            end = i + 1 + length
            if kind == Z:
                status = data[i + 5 : i + 6]
                point = syncs.popleft() if syncs else None
                if point is not None and point.inject is not None:
                    out.append(data[start:i])
                    out.append(point.inject)
                    start = i
                out.append(data[start:end])
                start = end
                self.tx_status = status
                now = _monotonic()
                if point is not None:
                    tenant.usage.query_seconds += now - point.started
                    if self.cancel_sent_for is point:
                        self.cancel_sent_for = None
                while syncs and syncs[0].synthetic is not None:
                    synthetic = syncs.popleft()
                    assert synthetic.synthetic is not None
                    out.append(synthetic.synthetic + wire.ready_for_query(status))
                self.idle_in_tx_since = now if status != b"I" else 0.0
            elif kind == ERR and self.cancel_sent_for is not None and end <= n:
                reworded = self._reword_cancel(data[i:end])
                if reworded is not None:
                    out.append(data[start:i])
                    out.append(reworded)
                    start = end
            if end > n:
                self.s_remaining = end - n
                break
            i = end
        if start < n:
            out.append(data[start:n] if start or n != len(data) else data)
        if len(out) == 1:
            self.transport.write(out[0])
        elif out:
            self.transport.writelines(out)

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
            if kind == K and length == 12:
                pid, key = struct.unpack_from("!ii", buf, i + 5)
                self.backend_key = (pid, key)
                self.proxy.cancel_targets[(pid, key)] = self.cancel_target
                if self.proxy.publish_cancel is not None:
                    config = self.proxy.config
                    host = config.pgbouncer_advertise_host or config.pgbouncer_host
                    self.proxy.publish_cancel(self.backend_key, (host, self.cancel_target[1]))
            elif kind == Z:
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
        tenant.active += 1
        tenant.usage.connections += 1
        self.counted_active = True
        self.opened = time.monotonic()
        if self.cold_start:
            COLD_STARTS.observe(self.opened - self.cold_start)
        self.state = READY
        if self.startup_timer:
            self.startup_timer.cancel()
        self.transport.write(ready)
        if rest:
            self.server_data(rest)

    # -- limits -------------------------------------------------------------------------

    def _admit(self, tenant: TenantState) -> float | None:
        """0.0 = go now, >0 = hold that long (or until a lease answers), None = reject."""
        if self.force_reject:
            self.force_reject = False
            self.first_hold = 0.0
            return None
        if self.reserved:
            self.reserved = False
            self.first_hold = 0.0
            return 0.0
        limiter = tenant.limiter
        assert limiter is not None
        limits = tenant.limits
        now = time.monotonic()
        budget = limits.queue_timeout_ms / 1000 if limits.over_limit == "throttle" else 0.0
        max_wait = max(0.0, (self.first_hold or now) + budget - now)
        if not self.proxy.redis_ok or self.proxy.lease is None:
            wait = limiter.admit_local(now, max_wait)
        else:
            wait = limiter.take(now, max_wait)
            if wait is None:
                return self._no_slot(tenant, limiter, now, max_wait)
            if limiter.low(now) and not limiter.leasing and now >= limiter.next_free:
                self.proxy.lease(tenant)  # the next batch, before this one runs out
        if wait:
            self.reserved = True  # the slot is ours: go without asking again when the wait is over
        else:  # going now, or refused: the next query starts its own wait
            self.first_hold = 0.0
        return wait

    def _no_slot(self, tenant: TenantState, limiter: TenantLimiter, now: float, max_wait: float) -> float | None:
        """No leased slot falls due in time: refuse, wait for the schedule, or ask Redis."""
        if limiter.holds(now) or now + max_wait < limiter.next_free:
            # Slots are held but fall due too late, or the schedule is full for longer than
            # the query may wait: a new lease would only come later still.
            self.first_hold = 0.0
            return None
        if now < limiter.next_free:
            return limiter.next_free - now  # then decide again (no slot is ours yet)
        if not limiter.leasing and self.proxy.lease is not None:
            self.proxy.lease(tenant)
        return -1.0  # hold until the lease answers

    def _hold(self, data: bytes, wait: float) -> None:
        """Throttle: keep the rest of the stream, stop reading, continue later."""
        tenant = self.tenant
        assert tenant is not None and self.transport is not None
        if not self.first_hold:
            self.first_hold = time.monotonic()
            tenant.usage.throttled += 1
        self.held = data
        self.transport.pause_reading()
        limits = tenant.limits
        max_wait = limits.queue_timeout_ms / 1000 if limits.over_limit == "throttle" else 0.0
        self.hold_deadline = self.first_hold + max_wait
        if wait > 0:
            self.hold_timer = asyncio.get_running_loop().call_later(wait, self.release)
        else:
            tenant.waiters.append(self)

    def release(self, reject: bool = False) -> None:
        if self.state != READY or self.held is None:
            return
        data, self.held = self.held, None
        self.hold_timer = None
        self.force_reject = reject
        self.client_data(data)
        if self.held is None and self.transport:
            self.transport.resume_reading()

    def _reject(self, tenant: TenantState, kind: int) -> None:
        tenant.usage.rejected += 1
        limits = tenant.limits
        retry = 1.0 / limits.qps if limits.qps else 1.0
        error = wire.error_response(
            "ERROR", "53400",
            f"query rate limit exceeded for tenant database {limits.database}: tier {limits.tier} allows "
            f"{limits.qps} queries per second",
            hint=f"retry after {retry * 1000:.0f} ms, slow down, or upgrade to a higher tier",
        )
        if kind == Q:
            point = SyncPoint(time.monotonic(), synthetic=error)
            if self.syncs:
                self.syncs.append(point)  # answered in order, after what is in flight
            elif self.transport:
                self.transport.write(error + wire.ready_for_query(self.tx_status))
        else:
            # Extended protocol: drop everything up to Sync; the server answers that Sync,
            # and the error goes out just before its ReadyForQuery.
            self.skip_to_sync = error

    # -- timeouts the tenant cannot switch off ---------------------------------------------

    def check_timeouts(self, now: float) -> None:
        if self.state != READY or self.tenant is None:
            return
        limits = self.tenant.limits
        if limits.statement_timeout_ms and self.syncs and self.cancel_sent_for is None:
            point = self.syncs[0]
            if point.synthetic is None and (now - point.started) * 1000 > limits.statement_timeout_ms:
                self.cancel_sent_for = point
                self.proxy.spawn(self._cancel_upstream())
        if (limits.idle_in_transaction_ms and self.idle_in_tx_since and not self.syncs
                and (now - self.idle_in_tx_since) * 1000 > limits.idle_in_transaction_ms):
                self.fail("FATAL", "25P03",
                          f"terminating connection: idle in transaction longer than the tier {limits.tier} "
                          f"limit of {limits.idle_in_transaction_ms} ms")

    async def _cancel_upstream(self) -> None:
        if self.backend_key is None:
            return
        await send_cancel(self.cancel_target, *self.backend_key)

    def _reword_cancel(self, message: bytes) -> bytes | None:
        fields = _error_fields(message)
        if fields.get("C") != "57014" or self.tenant is None:
            return None
        limits = self.tenant.limits
        return wire.error_response(
            fields.get("S", "ERROR"), "57014",
            f"canceling statement due to statement timeout: tier {limits.tier} allows "
            f"{limits.statement_timeout_ms} ms per statement",
            hint="make the query faster or upgrade to a higher tier",
        )

    cancel_target: tuple[str, int] = ("127.0.0.1", 0)


async def send_cancel(target: tuple[str, int], pid: int, key: int) -> None:
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


def _error_fields(message: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    body = message[5:]
    i = 0
    while i < len(body) and body[i] != 0:
        code = chr(body[i])
        end = body.index(0, i + 1)
        out[code] = body[i + 1 : end].decode(errors="replace")
        i = end + 1
    return out
