"""An in-process tenant proxy for tests, on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dynabase.devstack.stack import free_port
from dynabase.proxy.main import ProxySettings, serve
from dynabase.proxy.server import Proxy


@contextlib.asynccontextmanager
async def running_proxy(redis_url: str, replica: str, **settings: Any) -> AsyncIterator[tuple[int, Proxy]]:
    """Yields (port, proxy); stops it on exit. Extra settings are ProxySettings fields (TLS, advertise host)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    port = free_port()
    started: list[Proxy] = []
    task = asyncio.create_task(serve(
        ProxySettings("127.0.0.1", port, "127.0.0.1", redis_url, None, replica, settings.pop("metrics_port", 0),
                      **settings),
        stop, ready, on_start=started.append))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield port, started[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
