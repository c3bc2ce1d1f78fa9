"""The forwarding hot paths: once a connection is ready, bytes are forwarded as they
arrive and only the 5-byte message headers (type + length) are read, to find
Query/Execute/Sync on the way in and ReadyForQuery on the way out. Bodies are never
copied or parsed, except an ErrorResponse the session must reword.

Also the connection's side of admission: a query that must wait holds the rest of the
client's stream (reading paused) until it is released and replayed; a refused one is
answered with 53400 in order, after what is in flight.

Scanner is the base of session.ClientConnection, which supplies the hooks at the end.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import wire
from .admission import HOLD, rate_limit_error
from .tenants import TenantState

Q, E, S, F, Z = wire.QUERY, wire.EXECUTE, wire.SYNC, wire.FUNCTION_CALL, wire.READY_FOR_QUERY
ERR = wire.ERROR_RESPONSE
MAX_MESSAGE = wire.MAX_MESSAGE
_HEADER = wire.header
_monotonic = time.monotonic  # one global lookup on the hot path instead of two
# A connection's phases: start-up packet, connecting to PgBouncer, authenticating through
# it, then READY, when the scanners forward; CLOSED at the end.
STARTUP, CONNECTING, AUTH, READY, CLOSED = range(5)


@dataclass(slots=True)
class SyncPoint:
    """One expected ReadyForQuery: from a Query, a Sync, or a rejected Query (synthetic)."""

    started: float
    inject: bytes | None = None  # an ErrorResponse to send just before the server's ReadyForQuery
    synthetic: bytes | None = None  # a rejected simple Query: ErrorResponse, sent with our own RFQ
    counted: int = 0  # queries (Query/Execute) this point completes


class Upstream(asyncio.Protocol):
    """The connection to PgBouncer: what it sends goes through the client's server scanner."""

    def __init__(self, client: Scanner) -> None:
        self.client = client
        self.poke = client.poke
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # back from the kernel (handover.py): paused until it has resumed
            transport.pause_reading()  # type: ignore[attr-defined]
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.poke is not None:
            self.poke()
        self.client.server_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def pause_writing(self) -> None:  # PgBouncer reads slowly: stop reading the client
        self.client.pause_client()

    def resume_writing(self) -> None:
        self.client.resume_client()


class Scanner(asyncio.Protocol):
    def __init__(self, poke: Callable[[], None] | None) -> None:
        self.poke = poke  # busy polling (busypoll.py): called on every read; None when off
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.state = STARTUP
        self.tenant: TenantState | None = None
        self.in_kernel = False  # spliced (handover.py): neither socket is read here
        # client -> server
        self.c_remaining = 0  # bytes of a forwarded message still to come
        self.c_skip = 0  # bytes of a skipped message still to come
        self.c_partial = b""  # a header cut by the end of a read
        self.skip_to_sync: bytes | None = None  # a refused Execute: its error goes out at the next Sync
        self.batch_started = 0.0
        self.batch_queries = 0
        # server -> client
        self.s_remaining = 0
        self.s_partial = b""
        self.syncs: collections.deque[SyncPoint] = collections.deque()
        self.tx_status = b"I"
        self.idle_in_tx_since = 0.0
        self.cancel_sent_for: SyncPoint | None = None  # the session cancelled this statement itself
        # admission
        self.held: bytes | None = None  # the stream from a waiting query on
        self.hold_deadline = 0.0
        self.hold_timer: asyncio.TimerHandle | None = None
        self.force_reject = False
        self.reserved = False  # a slot was reserved for the held query
        self.first_hold = 0.0  # when the held query first had to wait (queueTimeout counts from here)

    # -- hooks: session.ClientConnection -------------------------------------------------------

    def fail(self, severity: str, sqlstate: str, message: str, hint: str | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _auth_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _reword_cancel(self, message: bytes) -> bytes | None:
        raise NotImplementedError

    # -- flow control --------------------------------------------------------------------------

    def pause_client(self) -> None:
        if self.transport:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport and self.held is None and not self.in_kernel:  # a held query keeps reading paused
            self.transport.resume_reading()

    def pause_writing(self) -> None:  # the client reads slowly: stop reading the server
        if self.upstream and self.upstream.transport:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream and self.upstream.transport and not self.in_kernel:
            self.upstream.transport.resume_reading()

    # -- client -> server ------------------------------------------------------------------------

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

    # -- server -> client ------------------------------------------------------------------------

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

    # -- admission: the connection's side ------------------------------------------------------

    def _admit(self, tenant: TenantState) -> float | None:
        """0.0 = go now, > 0 = hold that long, HOLD = until the limiter releases it, None = reject."""
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
        wait = limiter.admit(_monotonic(), self.first_hold)
        if not wait:  # going now, or refused: the next query starts its own wait
            self.first_hold = 0.0
        elif wait > 0.0:
            self.reserved = True  # the slot is ours: go without asking again when the wait is over
        return wait

    def _hold(self, data: bytes, wait: float) -> None:
        """Throttle: keep the rest of the stream, stop reading, continue later."""
        tenant = self.tenant
        assert tenant is not None and tenant.limiter is not None and self.transport is not None
        if not self.first_hold:
            self.first_hold = _monotonic()
            tenant.usage.throttled += 1
        self.held = data
        self.transport.pause_reading()
        self.hold_deadline = self.first_hold + tenant.limiter.budget
        if wait == HOLD:
            tenant.limiter.waiters.append(self)
        else:
            self.hold_timer = asyncio.get_running_loop().call_later(wait, self.release)

    def release(self, reject: bool = False) -> None:
        """Replay the held stream: the waiting query asks again (or, with ``reject``, is refused)."""
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
        error = rate_limit_error(tenant.limits, tenant.budget)
        if kind == Q:
            point = SyncPoint(_monotonic(), synthetic=error)
            if self.syncs:
                self.syncs.append(point)  # answered in order, after what is in flight
            elif self.transport:
                self.transport.write(error + wire.ready_for_query(self.tx_status))
        else:
            # Extended protocol: drop everything up to Sync; the server answers that Sync,
            # and the error goes out just before its ReadyForQuery.
            self.skip_to_sync = error
