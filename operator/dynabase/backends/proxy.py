"""Proxy backend: publish each tenant's proxy limits to Redis (hash + channel), and read
what the proxies write back (activity, wake-ups, usage).

Observe reads the whole hash once per pass; apply writes only the fields that
differ and announces them, so a pass without drift makes no Redis writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dynabase.desired.proxy import ProxyTenantLimits
from dynabase.keyspace import (
    ACTIVITY_KEY,
    LIMITS_CHANNEL,
    LIMITS_KEY,
    WAKE_CHANNEL,
    UsageSample,
    decode_limits_table,
    decode_usage,
    encode_changed,
    encode_limits,
    usage_key,
)

log = logging.getLogger(__name__)


class ProxyBackend:
    name = "proxy"

    def __init__(self, redis_url: str) -> None:
        # One retry on a fresh connection: after a Redis restart the pooled ones are dead.
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1),
                                              retry_on_error=[RedisConnectionError])
        self.writes = 0
        self.wakes_subscribed = asyncio.Event()  # set while Redis confirms wakes() is subscribed

    async def close(self) -> None:
        await self._redis.aclose()

    async def observe(self) -> dict[str, ProxyTenantLimits]:
        raw = await self._redis.hgetall(LIMITS_KEY)
        table, unreadable = decode_limits_table({str(k): str(v) for k, v in raw.items()})
        for database, why in unreadable.items():  # rewritten by this pass
            log.warning("unreadable proxy limits in Redis", extra={"database": database, "error": why})
        return table

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
                self.wakes_subscribed.clear()
                await asyncio.sleep(1.0)
            finally:
                self.wakes_subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def usage_hours(self, hours: Iterable[int]) -> dict[int, list[UsageSample]]:
        """The proxies' counters of these hours (a month is ~744) in one pipelined round trip."""
        hours = list(hours)
        if not hours:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(usage_key(hour))
            answers = await pipe.execute()
        return {hour: decode_usage({str(k): str(v) for k, v in raw.items()})
                for hour, raw in zip(hours, answers, strict=True)}

    async def usage_fields(self, hour: int) -> dict[str, str]:
        """One hour's usage hash as stored (MongoBackend.write_usage decodes it)."""
        raw = await self._redis.hgetall(usage_key(hour))
        return {str(k): str(v) for k, v in raw.items()}

    async def usage_fields_for_hours(self, hours: Iterable[int]) -> dict[int, list[UsageSample]]:
        """usage_hours without the empty hours."""
        return {hour: samples for hour, samples in (await self.usage_hours(hours)).items() if samples}

    async def apply(self, changed: dict[str, ProxyTenantLimits], removed: list[str]) -> None:
        if not changed and not removed:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            if changed:
                pipe.hset(LIMITS_KEY, mapping={k: encode_limits(v) for k, v in changed.items()})
            if removed:
                pipe.hdel(LIMITS_KEY, *removed)
            pipe.publish(LIMITS_CHANNEL, encode_changed([*changed, *removed]))
            await pipe.execute()
        self.writes += 1
