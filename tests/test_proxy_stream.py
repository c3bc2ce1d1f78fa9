"""The proxy's forwarding paths on byte streams cut at arbitrary points: what goes
through, what is counted, what is skipped. No sockets: a connection in the READY
state with transports that record what they are given."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.proxy.scanner import READY, Upstream
from dynabase.proxy.server import Proxy
from dynabase.proxy.session import ClientConnection
from dynabase.proxy.tenants import ProxyConfig, Tenants


class Recorder:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, data: list[bytes]) -> None:
        for chunk in data:
            self.data += chunk

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def message(kind: bytes, size: int) -> bytes:
    return kind + struct.pack("!I", size + 4) + bytes(range(256)) * (size // 256) + bytes(size % 256)


def connection(qps: int | None = None, *, over_limit: str = "reject",
               tenants: Tenants | None = None) -> tuple[ClientConnection, Recorder, Recorder]:
    """A READY connection of tenant "t" (``tenants``: its registry; by default the proxy is on
    its own, so limits are enforced locally)."""
    proxy = Proxy(ProxyConfig(), tenants)
    proxy.tenants.limits = {"t": ProxyTenantLimits("t/t", "t", "t", "T", "p", 10, qps, qps, 2000, over_limit,
                                                   None, None)}
    conn = ClientConnection(proxy)
    conn.tenant = proxy.tenants.get("t")
    conn.state = READY
    to_client, to_server = Recorder(), Recorder()
    conn.transport = to_client  # type: ignore[assignment]
    conn.upstream = Upstream(conn)
    conn.upstream.transport = to_server  # type: ignore[assignment]
    return conn, to_client, to_server


def feed(receive: object, stream: bytes, cuts: list[int]) -> None:
    at = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)}):
        receive(stream[at:cut])  # type: ignore[operator]
        at = cut


# A unit is one simple Query, or one extended batch (Parse, Bind, Execute, Sync).
units = st.lists(st.tuples(st.sampled_from(["simple", "extended"]), st.integers(0, 700)), min_size=1, max_size=8)
cuts = st.lists(st.integers(0, 10_000), max_size=12)


def client_stream(plan: list[tuple[str, int]]) -> list[bytes]:
    return [message(b"Q", size) if kind == "simple"
            else message(b"P", size) + message(b"B", 9) + message(b"E", 5) + message(b"S", 0)
            for kind, size in plan]


@settings(max_examples=150, deadline=None)
@given(plan=units, client_cuts=cuts, server_cuts=cuts, reply_size=st.integers(0, 600))
def test_any_split_forwards_every_byte_and_counts_every_query(plan: list[tuple[str, int]], client_cuts: list[int],
                                                              server_cuts: list[int], reply_size: int) -> None:
    conn, to_client, to_server = connection()
    stream = b"".join(client_stream(plan))
    feed(conn.data_received, stream, client_cuts)
    assert bytes(to_server.data) == stream
    assert conn.tenant is not None
    assert conn.tenant.usage.queries == len(plan)
    assert conn.tenant.usage.bytes_in == len(stream)
    assert len(conn.syncs) == len(plan)  # one ReadyForQuery expected per Query or Sync

    reply = b"".join(message(b"T", reply_size) + message(b"D", reply_size // 2) + message(b"C", 9)
                     + b"Z\x00\x00\x00\x05" + (b"T" if n % 2 else b"I") for n in range(len(plan)))
    assert conn.upstream is not None
    feed(conn.upstream.data_received, reply, server_cuts)
    assert bytes(to_client.data) == reply
    assert not conn.syncs
    assert conn.tx_status == (b"T" if len(plan) % 2 == 0 else b"I")


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=2, max_size=6), client_cuts=cuts)
def test_a_rejected_batch_is_skipped_up_to_its_sync_on_any_split(sizes: list[int], client_cuts: list[int]) -> None:
    conn, to_client, to_server = connection(qps=1)  # no Redis: one query now, the next a second later
    batches = client_stream([("extended", size) for size in sizes])
    feed(conn.data_received, b"".join(batches), client_cuts)
    # Parse and Bind are on their way before the Execute is refused; from it up to Sync, nothing.
    refused = [message(b"P", size) + message(b"B", 9) + message(b"S", 0) for size in sizes[1:]]
    assert bytes(to_server.data) == batches[0] + b"".join(refused)
    assert conn.tenant is not None
    assert conn.tenant.usage.queries == 1 and conn.tenant.usage.rejected == len(batches) - 1
    reply = b"".join(b"Z\x00\x00\x00\x05I" for _ in batches)
    assert conn.upstream is not None
    conn.upstream.data_received(reply)
    errors = bytes(to_client.data).count(b"53400")
    assert errors == len(batches) - 1  # each skipped batch answered with the rate-limit error
