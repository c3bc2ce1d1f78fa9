"""The kernel fast path, per proxy: authenticated connections whose tenant needs no
per-query decision are spliced in the kernel (kernel.py's program), so their bytes never
reach this process. handover.py decides which, and takes them back.

While a connection is spliced the proxy reads neither socket. It hears of a hang-up
through an epoll set of its own that wakes only for hang-ups and errors, never for data,
and it reads the connection's counters from the kernel when metering flushes or is
scraped, when the sweep checks timeouts or drains, and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from . import kernel
from .kernel import Conn, KernelUnavailable, SpliceProgram
from .metering import Usage

log = logging.getLogger(__name__)
KERNEL_SPLICE = Gauge("dynabase_proxy_kernel_splice",
                      "1 while authenticated connections are forwarded in the kernel (BPF sockmap); "
                      "0: in Python (see the log for why).")
SPLICED = Counter("dynabase_proxy_kernel_spliced_connections", "Connections handed to the kernel fast path.")
TAKEN_BACK = Counter("dynabase_proxy_kernel_taken_back_connections",
                     "Spliced connections the proxy took back (a QPS limit or a statement timeout).")
READY_IDLE = ord("I")
_TCP_INFO = struct.Struct("<QQ")  # tcpi_bytes_sent, tcpi_bytes_retrans at offset 200 of struct tcp_info


def written(sock: Any) -> int:
    """Bytes the kernel has taken into a TCP socket's stream so far (sent once, or waiting
    to be): what the proxy and the kernel's redirects have written into it together."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    sent, retransmitted = _TCP_INFO.unpack_from(info, 200)
    return int(sent - retransmitted + int.from_bytes(info[144:148], "little"))  # + tcpi_notsent_bytes


class Splice:
    """One connection in the kernel: its counters, what of them metering has, and the
    bytes each socket had taken before, to tell when the kernel's last forwards are out."""

    __slots__ = ("base", "client", "fastpath", "fds", "ids", "seen", "server", "slot", "taken", "usage")

    def __init__(self, fastpath: FastPath, client: Any, server: Any, usage: Usage, own_writes: int) -> None:
        self.fastpath = fastpath
        self.client, self.server, self.usage = client, server, usage
        self.fds = (client.fileno(), server.fileno())  # as registered for hang-ups (fileno() is -1 once closed)
        # What each socket had taken before the kernel forwards into it (the proxy's own
        # writes still to come included): the client's, PgBouncer's.
        self.base = (written(client) + own_writes, written(server))
        self.slot, *ids = fastpath.program.open(client, server)
        self.ids = (ids[0], ids[1])
        self.seen = (0, 0, 0, 0)  # queries, bytes in, bytes out, query ns already in usage
        self.taken = False

    def counters(self) -> Conn:
        return self.fastpath.program.read(self.slot)

    def meter(self, conn: Conn | None = None) -> Conn:
        """Add what the kernel counted since the last call to the tenant's usage."""
        conn = conn or self.counters()
        now = (conn.queries, conn.bytes[0], conn.bytes[1], conn.query_ns)
        seen, self.seen = self.seen, now
        usage = self.usage
        usage.queries += now[0] - seen[0]
        usage.bytes_in += now[1] - seen[1]
        usage.bytes_out += now[2] - seen[2]
        usage.query_seconds += (now[3] - seen[3]) / 1e9
        return conn

    @staticmethod
    def idle(conn: Conn) -> bool:
        """No statement in flight and no transaction open."""
        return bool(conn.syncs == conn.readies and conn.status in (0, READY_IDLE))

    @staticmethod
    def running_since(conn: Conn) -> float | None:
        """When the oldest statement still running was sent (time.monotonic()), if any."""
        return float(conn.sent_at(conn.readies + 1)) if conn.syncs > conn.readies else None

    @staticmethod
    def idle_in_transaction_since(conn: Conn) -> float | None:
        if conn.syncs != conn.readies or conn.status in (0, READY_IDLE) or conn.client_at > conn.ready_at:
            return None
        return float(conn.ready_at) / 1e9

    def take_back(self) -> Conn:
        """From the next packet on, both directions come to the proxy; returns the final counters."""
        self.fastpath.program.to_user(self.slot)
        self.taken = True
        TAKEN_BACK.inc()
        return self.counters()  # read under the lock the program commits under: nothing more will be

    def flushed(self, conn: Conn) -> bool:
        """Whether the kernel's forwards are all in the sockets' streams, so what the proxy
        writes next comes after them."""
        return bool(written(self.client) >= self.base[0] + conn.bytes[1]
                    and written(self.server) >= self.base[1] + conn.bytes[0])

    def close(self) -> None:
        self.fastpath.forget(self)


class FastPath:
    def __init__(self, program: SpliceProgram) -> None:
        self.program = program
        self.splices: set[Splice] = set()
        self.hangups: dict[int, Callable[[], None]] = {}  # fd -> what to do when it hangs up
        self.epoll = select.epoll()
        self.loop: asyncio.AbstractEventLoop | None = None

    def splice(self, client: Any, server: Any, usage: Usage, own_writes: int,
               hangup: Callable[[], None]) -> Splice:
        """Hand two sockets to the kernel (the caller has stopped reading them); raises
        KernelUnavailable when it cannot take them."""
        spliced = Splice(self, client, server, usage, own_writes)
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.epoll.fileno(), self._hung_up)
        for fd in spliced.fds:
            self.epoll.register(fd, select.EPOLLRDHUP)  # no EPOLLIN: data never wakes us
            self.hangups[fd] = hangup
        self.splices.add(spliced)
        SPLICED.inc()
        return spliced

    def _hung_up(self) -> None:
        for fd, _ in self.epoll.poll(0):
            hangup = self.hangups.pop(fd, None)
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
            if hangup is not None:
                hangup()

    def unwatch(self, spliced: Splice) -> None:
        for fd in spliced.fds:
            if self.hangups.pop(fd, None) is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(fd)

    def forget(self, spliced: Splice) -> None:
        """A spliced connection ends: its entries go (its sockets leave the socket map as they close)."""
        if spliced not in self.splices:
            return
        self.splices.discard(spliced)
        self.unwatch(spliced)
        self.program.close(spliced.slot, spliced.ids)

    def meter(self) -> None:
        """Bring every spliced connection's counts into its tenant's usage."""
        for spliced in list(self.splices):
            if not spliced.taken:
                spliced.meter()

    def close(self) -> None:
        for spliced in list(self.splices):
            self.forget(spliced)
        if self.loop is not None:
            self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()


def start(mode: str, cache: Path) -> FastPath | None:
    """The fast path for ``mode`` (auto: if this machine allows it; on: it must; off), or None."""
    if mode == "off":
        KERNEL_SPLICE.set(0)
        return None
    try:
        program = kernel.load(cache)
    except KernelUnavailable as exc:
        KERNEL_SPLICE.set(0)
        if mode == "on":
            raise
        log.warning("kernel splice unavailable; forwarding in Python", extra={"reason": str(exc)})
        return None
    KERNEL_SPLICE.set(1)
    return FastPath(program)
