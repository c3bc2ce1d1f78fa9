"""Running the proxy: event loop (uvloop), Redis coordinator, Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynabase.stopping import stop_on_signals

from .coordinator import Coordinator
from .server import Proxy
from .tenants import ProxyConfig

STARTUP_WAIT = 5.0  # seconds to wait for Redis before serving from an empty table


@dataclass
class ProxySettings:
    listen_host: str
    listen_port: int
    pgbouncer_host: str
    redis_url: str
    agent_id: str | None
    replica_id: str
    metrics_port: int
    tls_cert: str | None = None
    tls_key: str | None = None
    pgbouncer_advertise_host: str | None = None  # how other replicas reach our PgBouncer (cancels)
    busy_poll_us: int = 0  # spin this long after traffic instead of sleeping (busypoll.py); 0 = off
    kernel_splice: str = "auto"  # forward in the kernel where possible (fastpath.py): auto, on, off


class TenantCollector(Collector):
    """Per-tenant counters read at scrape time: the hot path only increments ints."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["tenant", "tier"]
        families = {
            "queries": CounterMetricFamily("dynabase_proxy_queries", "Queries (Query/Execute) forwarded.",
                                           labels=labels),
            "query_seconds": CounterMetricFamily("dynabase_proxy_query_seconds", "Time from query to ReadyForQuery.",
                                                 labels=labels),
            "throttled": CounterMetricFamily("dynabase_proxy_throttled", "Queries delayed by the QPS limit.",
                                             labels=labels),
            "rejected": CounterMetricFamily("dynabase_proxy_rejected", "Queries refused by the QPS limit (53400).",
                                            labels=labels),
            "rejected_connections": CounterMetricFamily(
                "dynabase_proxy_rejected_connections", "Connections refused by the cap (53300).", labels=labels),
            "bytes_in": CounterMetricFamily("dynabase_proxy_bytes_in", "Bytes from clients.", labels=labels),
            "bytes_out": CounterMetricFamily("dynabase_proxy_bytes_out", "Bytes to clients.", labels=labels),
        }
        active = GaugeMetricFamily("dynabase_proxy_connections", "Authenticated client connections.", labels=labels)
        self.proxy.tenants.meter()
        hits = CounterMetricFamily(
            "dynabase_proxy_limit_hits", "Times a tenant hit a tier limit at the proxy, by kind: connections "
            "(refused, 53300), qps (throttled or refused), statement_timeout (cancelled by the proxy, 57014).",
            labels=[*labels, "kind"])
        for state in self.proxy.tenants.states.values():
            usage = state.usage
            values = [usage.tenant, usage.tier]
            for name, family in families.items():
                family.add_metric(values, float(getattr(usage, name)))
            active.add_metric(values, state.active)
            hits.add_metric([*values, "connections"], usage.rejected_connections)
            hits.add_metric([*values, "qps"], usage.throttled + usage.rejected)
            hits.add_metric([*values, "statement_timeout"], usage.statement_timeouts)
        yield from families.values()
        yield active
        yield hits


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve(settings: ProxySettings, stop: asyncio.Event, ready: asyncio.Event | None = None,
                on_start: Callable[[Proxy], None] | None = None) -> Proxy:
    coordinator = Coordinator(settings.redis_url, replica_id=settings.replica_id, agent_id=settings.agent_id)
    proxy = Proxy(
        ProxyConfig(listen_host=settings.listen_host, listen_port=settings.listen_port,
                    pgbouncer_host=settings.pgbouncer_host,
                    ssl_context=ssl_context(settings.tls_cert, settings.tls_key),
                    pgbouncer_advertise_host=settings.pgbouncer_advertise_host,
                    busy_poll_us=settings.busy_poll_us, kernel_splice=settings.kernel_splice),
        coordinator.tenants,
    )
    watcher = asyncio.create_task(coordinator.watch(stop))
    flusher = asyncio.create_task(coordinator.flush_loop(stop))
    # Serve once the limits are loaded (or after a short wait, from an empty table).
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proxy.tenants.changes.until(lambda: coordinator.connected), STARTUP_WAIT)
    await proxy.start()
    if settings.metrics_port:
        with contextlib.suppress(ValueError):
            REGISTRY.register(TenantCollector(proxy))
        start_http_server(settings.metrics_port)
    if on_start is not None:
        on_start(proxy)
    if ready is not None:
        ready.set()
    await stop.wait()
    await proxy.stop()
    for task in (watcher, flusher):
        task.cancel()
    await asyncio.gather(watcher, flusher, return_exceptions=True)
    await coordinator.close()
    return proxy


def run(settings: ProxySettings) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        await serve(settings, stop_on_signals())

    asyncio.run(main())


def default_replica_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"
