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
import fcntl
import termios
import time
from typing import Any

from .fastpath import FastPath, Splice
from .kernel import Conn, KernelUnavailable
from .scanner import CLOSED, E, Q, Scanner, SyncPoint
from .tenants import TenantState


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
                and self.transport.get_extra_info("sslcontext") is None)

    def try_splice(self, ready: bytes) -> bool:
        """At the end of authentication, with the ReadyForQuery for the client in hand and
        nothing else pending: splice, then send it. False: the scanners forward (nothing sent)."""
        fastpath, tenant = self.fastpath(), self.tenant
        if fastpath is None or tenant is None or self.upstream is None or self.upstream.transport is None:
            return False
        client_transport, server_transport = self.transport, self.upstream.transport
        assert client_transport is not None
        client, server = client_transport.get_extra_info("socket"), server_transport.get_extra_info("socket")
        if (client is None or server is None or client_transport.get_write_buffer_size()
                or server_transport.get_write_buffer_size()):
            return False
        client_transport.pause_reading()
        server_transport.pause_reading()
        try:
            self.splice = fastpath.splice(client, server, tenant.usage, len(ready), self.close)
        except (KernelUnavailable, OSError):
            client_transport.resume_reading()
            server_transport.resume_reading()
            return False
        self.in_kernel = True
        client_transport.write(ready)
        if _unread(client) or _unread(server):
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
        if self.state == CLOSED:
            return
        spliced.meter(conn)
        self._resume(conn)

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
        self.in_kernel = False
        self.upstream.transport.resume_reading()  # type: ignore[union-attr]  # a _Skipping stands in
        if self.held is None:
            self.transport.resume_reading()  # type: ignore[union-attr]

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
        """The kernel's counters while it forwards this connection, else None."""
        if self.splice is None or self.splice.taken:
            return None
        return self.splice.counters()
