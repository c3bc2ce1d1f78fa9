"""Awaiting what happens in Redis instead of sleeping for it.

A confirmed subscription to a channel, and writes to a key through Redis' keyspace
notifications: a proxy's usage flush or a PgBouncer agent's report run on their own
clocks, and these are the real events that say they ran.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

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
