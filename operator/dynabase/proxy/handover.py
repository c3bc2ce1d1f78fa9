"""Handing an authenticated connection to the kernel fast path (fastpath.py) and taking
it back: the part of a connection's life between the session (session.py) and the
Python forwarding it replaces (scanner.py).

A connection is spliced when its authentication ends, just before the proxy sends the
client its first ReadyForQuery (so the client has nothing in flight yet), if its tenant
has no QPS limit, it is not TLS, and the fast path runs. While spliced, the kernel
counts its queries, bytes and statement times; the session reads them for metering,
timeouts and draining. The proxy takes it back when the tenant gets a QPS limit or a
statement runs past the tier's timeout (so the cancel's error is reworded as usual):
both directions then come to the scanners again, which resume where the kernel stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import termios
import time
from typing import Any

from .fastpath import FastPath, Splice
from .kernel import Conn, KernelUnavailable
from .scanner import CLOSED, E, Q, Scanner, SyncPoint
from .tenants import TenantState


class SocketEnd:
    """A spliced connection's socket, taken from the event loop: what the session may still
    do with it (write a last error, close it), in the shape of a transport."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # best effort, as for any closing connection
            self.sock.send(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def is_closing(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.sock.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def detach(transport: asyncio.Transport) -> socket.socket:
    """The transport's socket, out of the event loop. Paused reading is not enough: the loop
    (libuv) leaves the socket in its epoll set, and every packet the kernel forwards would
    wake it for nothing. A copy of the descriptor keeps the socket open while the transport
    closes its own."""
    raw = transport.get_extra_info("socket")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    transport.set_protocol(asyncio.Protocol())  # the transport's end is not the connection's
    transport.close()
    return sock


def _unread(sock: Any) -> int:
    """Bytes waiting in a socket's receive queue."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


class _Skipping:
    """Stands in for a transport until the first ``skip`` bytes written to it are dropped
    (the kernel already sent them), then puts the transport back."""

    def __init__(self, transport: asyncio.Transport, skip: int, restore: Any) -> None:
        self.transport, self.skip, self.restore = transport, skip, restore

    def write(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
            if not self.skip:
                self.restore(self.transport)
        if data:
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Handover(Scanner):
    splice: Splice | None = None  # set once spliced; .taken once taken back

    def fastpath(self) -> FastPath | None:
        raise NotImplementedError  # the proxy's (session.ClientConnection)

    def spliceable(self, tenant: TenantState) -> bool:
        """Whether the kernel can forward this connection: nothing to decide per query, no TLS."""
        assert self.transport is not None
        return (tenant.limiter is None and self.fastpath() is not None
                and self.transport.get_extra_info("sslcontext") is None
                and self.transport.get_extra_info("socket") is not None)

    def try_splice(self, ready: bytes) -> bool:
        """At the end of authentication, with the ReadyForQuery for the client in hand and
        nothing else pending: splice, then send it. False: the scanners forward (nothing sent)."""
        fastpath, tenant = self.fastpath(), self.tenant
        if fastpath is None or tenant is None or self.upstream is None or self.upstream.transport is None:
            return False
        client_transport, server_transport = self.transport, self.upstream.transport
        assert client_transport is not None
        if client_transport.get_write_buffer_size() or server_transport.get_write_buffer_size():
            return False
        client, server = SocketEnd(detach(client_transport)), SocketEnd(detach(server_transport))
        self.transport, self.upstream.transport = client, server  # type: ignore[assignment]
        self.in_kernel = True
        try:
            self.splice = fastpath.splice(client.sock, server.sock, tenant.usage, len(ready), self.close)
        except (KernelUnavailable, OSError):
            self.splice = None
            client.write(ready)
            self.spawn(self._reattach(None))
            return True
        client.write(ready)
        if _unread(client.sock) or _unread(server.sock):
            # Bytes that came before the sockets were in the kernel's map wait there unseen:
            # the scanners read them instead.
            self.take_back()
        return True

    def limits_changed(self) -> None:
        """The tenant's limits changed: a QPS limit needs every query to come through here."""
        if self.splice is not None and self.tenant is not None and self.tenant.limiter is not None:
            self.take_back()

    def take_back(self) -> None:
        spliced = self.splice
        if spliced is None or spliced.taken:
            return
        conn = spliced.take_back()
        self.spawn(self._settle(spliced, conn))

    def spawn(self, coro: Any) -> None:
        raise NotImplementedError

    async def _settle(self, spliced: Splice, conn: Conn) -> None:
        """Once the kernel's last forwards are out, the scanners continue where it stopped."""
        while not spliced.flushed(conn):
            if self.state == CLOSED:
                return
            await asyncio.sleep(0.001)
        spliced.fastpath.unwatch(spliced)  # the event loop hears of hang-ups again
        await self._reattach(conn)

    async def _reattach(self, conn: Conn | None) -> None:
        """The sockets back into the event loop (paused until the scanners' state is set)."""
        if self.state == CLOSED or self.upstream is None:
            return
        client, server = self.transport, self.upstream.transport
        assert isinstance(client, SocketEnd) and isinstance(server, SocketEnd)
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        try:
            await loop.connect_accepted_socket(lambda: upstream, server.sock)
            await loop.connect_accepted_socket(lambda: self, client.sock)
        except OSError:
            self.close()
            return
        if self.state == CLOSED:
            return
        if conn is not None and self.splice is not None:
            self.splice.meter(conn)
            if conn.dir[0].lost or conn.dir[1].lost:
                self.fail("FATAL", "08P01", "invalid message length from client")  # as the scanner would
                return
            self._resume(conn)
        self.in_kernel = False
        self.upstream.transport.resume_reading()  # a _Skipping may stand in
        if self.held is None:
            self.transport.resume_reading()

    def _resume(self, conn: Conn) -> None:
        client, server = conn.dir[0], conn.dir[1]
        assert self.transport is not None and self.upstream is not None and self.upstream.transport is not None
        self.tx_status = bytes([conn.status]) if conn.status else b"I"
        self.syncs.extend(SyncPoint(conn.sent_at(conn.readies + 1 + n)) for n in range(conn.syncs - conn.readies))
        self.idle_in_tx_since = Splice.idle_in_transaction_since(conn) or 0.0
        if client.hdr_len:  # a header the kernel began to forward: the scanner completes it
            self.c_partial = bytes(client.hdr[: client.hdr_len])
            self.upstream.transport = _Skipping(self.upstream.transport, client.hdr_len,  # type: ignore[assignment]
                                                self._restore_upstream)
            if client.hdr[0] in (Q, E):
                self.reserved = True  # it is on its way already: no admission can stop it
        else:
            self.c_remaining = client.rem
        if server.hdr_len or server.status_next:
            # The kernel forwarded (part of) this header; a ReadyForQuery it counted but whose
            # status byte is still to come is answered here once more, with no time of its own.
            header = (bytes(server.hdr[: server.hdr_len]) if server.hdr_len
                      else b"Z" + (server.rem + 4).to_bytes(4, "big"))
            if server.status_next:
                self.syncs.appendleft(SyncPoint(time.monotonic()))
            self.s_partial = header
            self.transport = _Skipping(self.transport, len(header), self._restore_client)  # type: ignore[assignment]
        else:
            self.s_remaining = server.rem

    def _restore_upstream(self, transport: asyncio.Transport) -> None:
        if self.upstream is not None:
            self.upstream.transport = transport

    def _restore_client(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def end_splice(self) -> None:
        """At close: the last counts into metering, the kernel's entries freed."""
        spliced = self.splice
        if spliced is None:
            return
        if not spliced.taken:
            spliced.meter()
        spliced.close()

    # -- what the session asks of a spliced connection --------------------------------------

    def kernel_counters(self) -> Conn | None:
        """The kernel's counters until the scanners have taken over from it (final once it
        is being taken back), else None."""
        if not self.in_kernel or self.splice is None:
            return None
        return self.splice.counters()
