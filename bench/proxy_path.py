"""The proxy's per-message Python work, without sockets: one connection in the
READY state fed pgbench-like round trips (simple and extended protocol, and simple
for a tenant with a QPS limit too high to bite, so every query goes through
admission), and the share of it that is metering (the usage counters the hot path
increments).

    python -m bench.proxy_path

Sockets, uvloop and the kernel are left out on purpose: this is the part of a
round trip the proxy's own code decides, the ceiling for what tuning it can buy.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.proxy.metering import Usage
from dynabase.proxy.scanner import READY, Upstream
from dynabase.proxy.server import Proxy
from dynabase.proxy.session import ClientConnection
from dynabase.proxy.tenants import ProxyConfig


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


QUERY = message(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 40215;\x00")
ROW = (message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00")
       + message(b"D", b"\x00\x01\x00\x00\x00\x04-123"))
SIMPLE_REPLY = ROW + message(b"C", b"SELECT 1\x00") + message(b"Z", b"I")
EXTENDED = (message(b"P", b"\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x00")
            + message(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0540215\x00\x00")
            + message(b"D", b"P\x00") + message(b"E", b"\x00\x00\x00\x00\x00") + message(b"S", b""))
EXTENDED_REPLY = message(b"1", b"") + message(b"2", b"") + SIMPLE_REPLY


class NullTransport:
    """Takes writes and drops them, like a socket that is never full."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass


@dataclass
class PathCost:
    mode: str
    round_trip_ns: float  # both data_received callbacks for one query and its reply
    metering_ns: float  # the usage counter increments of one query


UNBITING_QPS = 10**9  # a limit every query is checked against and none reaches


def ready_connection(qps: int | None = None) -> tuple[ClientConnection, Usage]:
    proxy = Proxy(ProxyConfig())  # on its own: a limit is decided from the local share
    proxy.tenants.limits = {"t": ProxyTenantLimits("bench/t", "t", "t", "BENCH", "p", 100, qps, qps, 0, "reject",
                                                   None, None)}
    conn = ClientConnection(proxy)
    conn.tenant = proxy.tenants.get("t")
    assert conn.tenant is not None
    usage = conn.tenant.usage
    conn.state = READY
    conn.transport = NullTransport()  # type: ignore[assignment]
    conn.upstream = Upstream(conn)
    conn.upstream.transport = NullTransport()  # type: ignore[assignment]
    return conn, usage


def time_round_trips(request: bytes, reply: bytes, rounds: int, qps: int | None = None) -> float:
    conn, _ = ready_connection(qps)
    assert conn.upstream is not None
    from_client, from_server = conn.data_received, conn.upstream.data_received
    started = time.perf_counter_ns()
    for _ in range(rounds):
        from_client(request)
        from_server(reply)
    return (time.perf_counter_ns() - started) / rounds


def time_metering(request: bytes, reply: bytes, rounds: int) -> float:
    """The same increments the hot path makes per query: bytes in, queries, bytes out, query time."""
    usage = Usage("bench/t", "BENCH")
    started_at = time.monotonic()
    now = started_at + 0.0001
    started = time.perf_counter_ns()
    for _ in range(rounds):
        usage.bytes_in += len(request)
        usage.queries += 1
        usage.bytes_out += len(reply)
        usage.query_seconds += now - started_at
    loop_only = time.perf_counter_ns()
    for _ in range(rounds):
        pass
    ended = time.perf_counter_ns()
    return ((loop_only - started) - (ended - loop_only)) / rounds


def measure(rounds: int = 200_000) -> list[PathCost]:
    out = []
    modes = (("simple", QUERY, SIMPLE_REPLY, None), ("extended", EXTENDED, EXTENDED_REPLY, None),
             ("limited", QUERY, SIMPLE_REPLY, UNBITING_QPS))
    for mode, request, reply, qps in modes:
        time_round_trips(request, reply, rounds // 10, qps)  # warm up
        best = min(time_round_trips(request, reply, rounds, qps) for _ in range(3))
        metering = min(time_metering(request, reply, rounds) for _ in range(3))
        out.append(PathCost(mode, best, metering))
    return out


def report(costs: list[PathCost]) -> None:
    for cost in costs:
        ratio = cost.round_trip_ns / max(cost.round_trip_ns - cost.metering_ns, 1.0)
        print(f"{cost.mode:<9} proxy Python per query {cost.round_trip_ns / 1000:.2f} us, of which metering "
              f"{cost.metering_ns:.0f} ns: off/on throughput ratio of this code {ratio:.3f}", flush=True)


def main() -> None:
    report(measure())


if __name__ == "__main__":
    main()
