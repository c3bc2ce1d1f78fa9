"""Proxy backend: publish each tenant's proxy limits to Redis (hash + channel).

Observe reads the whole hash once per pass; apply writes only the fields that
differ and announces them, so a pass without drift makes no Redis writes.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from dynabase.desired.proxy import LIMITS_CHANNEL, LIMITS_KEY, ProxyTenantLimits


class ProxyBackend:
    name = "proxy"

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.writes = 0

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
