"""Awaiting what happens in the real servers instead of sleeping for it.

A confirmed Redis subscription, and writes to a Redis key through keyspace notifications
(a proxy's usage flush or a PgBouncer agent's report run on their own clocks: these are the
real events that say they ran); connections the server ended; idleness as Postgres counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from dynabase.keyspace import ACTIVITY_KEY

WAIT_SECONDS = 15.0  # a safety net for a writer that never comes, not a measure of speed


class Subscription:
    def __init__(self, pubsub: Any, channel: str) -> None:
        self.pubsub, self.channel = pubsub, channel

    async def next(self, timeout: float = WAIT_SECONDS) -> str:
        """The next message's data."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        return str(message["data"])
        except TimeoutError:
            raise AssertionError(f"nothing published on {self.channel} within {timeout}s") from None


@contextlib.asynccontextmanager
async def subscribed(redis_url: str, channel: str) -> AsyncIterator[Subscription]:
    """Subscribed to ``channel``, with Redis' confirmation read: nothing published afterwards is missed."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        async with asyncio.timeout(WAIT_SECONDS):
            while (await pubsub.get_message(timeout=None) or {}).get("type") != "subscribe":
                pass
        yield Subscription(pubsub, channel)
    finally:
        await pubsub.aclose()
        await client.aclose()


class KeyWrites:
    def __init__(self, subscription: Subscription, key: str) -> None:
        self.subscription, self.key = subscription, key

    async def until(self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS) -> None:
        """Returns once ``check()`` holds, checking it now and after each write to the key."""
        try:
            async with asyncio.timeout(timeout):
                while not await check():
                    await self.subscription.next(timeout)
        except TimeoutError:
            raise AssertionError(f"no write to {self.key} gave {what} within {timeout}s") from None


@contextlib.asynccontextmanager
async def key_writes(redis_url: str, key: str) -> AsyncIterator[KeyWrites]:
    """Notified of every write to ``key`` (keyspace notifications, switched on here if they are off)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        flags = str((await client.config_get("notify-keyspace-events")).get("notify-keyspace-events", ""))
        if not {"K", "A"} <= set(flags):
            await client.config_set("notify-keyspace-events", "".join(sorted(set(flags) | {"K", "A"})))
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
    finally:
        await client.aclose()
    async with subscribed(redis_url, f"__keyspace@{db}__:{key}") as subscription:
        yield KeyWrites(subscription, key)


def terminations(conns: list[asyncpg.Connection]) -> list[asyncio.Future[None]]:
    """One future per connection, done when asyncpg sees the server end it."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = []
    for conn in conns:
        future: asyncio.Future[None] = loop.create_future()
        conn.add_termination_listener(lambda _conn, f=future: f.done() or f.set_result(None))
        futures.append(future)
    return futures


async def ended(futures: list[asyncio.Future[None]], count: int, timeout: float = WAIT_SECONDS) -> None:
    """Returns once ``count`` of the connections behind ``terminations()`` have been ended."""
    while sum(f.done() for f in futures) < count:
        finished, _ = await asyncio.wait([f for f in futures if not f.done()], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        assert finished, f"{sum(f.done() for f in futures)} of {count} connections were ended within {timeout}s"


async def idle_in_postgres(dsn: str, role: str, seconds: float) -> None:
    """The engine ends only sessions that Postgres' own clock shows idle for the idleTimeout (a session
    that just woke the tenant is safe): wait for the time Postgres says is left, nothing more."""
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval(
            "SELECT extract(epoch FROM max(state_change) + make_interval(secs => $2) - now()) "
            "FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'", role, seconds)
    finally:
        await conn.close()
    if left is not None and left > 0:
        await asyncio.sleep(float(left) + 0.01)


@contextlib.asynccontextmanager
async def activity_recorded(redis_url: str, *databases: str) -> AsyncIterator[dict[str, float]]:
    """Around queries through a proxy: on leaving, waits until a proxy's usage flush has recorded
    activity of each database since the block began, and fills the yielded dict with those times."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    since, times = time.time(), {}

    async def recorded() -> bool:
        scores = await client.zmscore(ACTIVITY_KEY, list(databases))
        times.update({d: float(s) for d, s in zip(databases, scores, strict=True) if s is not None})
        return all(times.get(d, 0.0) >= since for d in databases)

    try:
        async with key_writes(redis_url, ACTIVITY_KEY) as writes:
            yield times
            await writes.until(recorded, f"activity of {', '.join(databases)}")
    finally:
        await client.aclose()
