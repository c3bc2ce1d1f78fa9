"""Proxy backend: publish each tenant's proxy limits to Redis (hash + channel).

Observe reads the whole hash once per pass; apply writes only the fields that
differ and announces them, so a pass without drift makes no Redis writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis

from dynabase.desired.proxy import ACTIVITY_KEY, LIMITS_CHANNEL, LIMITS_KEY, WAKE_CHANNEL, ProxyTenantLimits


class ProxyBackend:
    name = "proxy"

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.writes = 0
        self.wakes_subscribed = asyncio.Event()  # set while Redis confirms wakes() is subscribed

    async def close(self) -> None:
        await self._redis.aclose()

    async def observe(self) -> dict[str, ProxyTenantLimits]:
        raw = await self._redis.hgetall(LIMITS_KEY)
        out: dict[str, ProxyTenantLimits] = {}
        for database, text in raw.items():
            try:
                out[str(database)] = ProxyTenantLimits.from_json(str(text))
            except (TypeError, ValueError):
                continue  # unreadable entry: rewritten by this pass
        return out

    async def activity(self, databases: list[str]) -> dict[str, float]:
        """Epoch of each of these tenant databases' last query through any proxy replica."""
        if not databases:
            return {}
        scores = await self._redis.zmscore(ACTIVITY_KEY, databases)
        return {d: float(score) for d, score in zip(databases, scores, strict=True) if score is not None}

    async def wakes(self, on_wake: Callable[[str], None], stop: asyncio.Event) -> None:
        """Call ``on_wake(database)`` for each wake-up a proxy announces, until ``stop``; reconnects."""
        while not stop.is_set():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(WAKE_CHANNEL)
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":  # Redis confirmed: from now on no wake-up is missed
                        self.wakes_subscribed.set()
                    elif message["type"] == "message":
                        on_wake(str(message["data"]))
            except (aioredis.RedisError, OSError):
                await asyncio.sleep(1.0)
            finally:
                self.wakes_subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def usage_hours(self, hours: list[int]) -> dict[int, dict[str, str]]:
        """The proxies' usage hashes of these hours, in one round trip."""
        if not hours:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(f"dynabase:usage:{hour}")
            answers = await pipe.execute()
        return {hour: {str(k): str(v) for k, v in raw.items()} for hour, raw in zip(hours, answers, strict=True)}

    async def usage_fields(self, hour: int) -> dict[str, str]:
        """The proxies' cumulative counters for one hour: "<tenant>|<replica>" -> JSON."""
        raw = await self._redis.hgetall(f"dynabase:usage:{hour}")
        return {str(k): str(v) for k, v in raw.items()}

    async def usage_fields_for_hours(self, hours: range) -> dict[int, dict[str, str]]:
        """usage_fields of many hours (a month is ~744) in one pipelined round trip; empty hours left out."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(f"dynabase:usage:{hour}")
            replies = await pipe.execute()
        return {hour: {str(k): str(v) for k, v in raw.items()} for hour, raw in zip(hours, replies, strict=True) if raw}

    async def apply(self, changed: dict[str, ProxyTenantLimits], removed: list[str]) -> None:
        if not changed and not removed:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            if changed:
                pipe.hset(LIMITS_KEY, mapping={k: v.to_json() for k, v in changed.items()})
            if removed:
                pipe.hdel(LIMITS_KEY, *removed)
            pipe.publish(LIMITS_CHANNEL, ",".join([*changed, *removed]))
            await pipe.execute()
        self.writes += 1
