"""Redis backend: one ACL user per tenant, and a keyspace census for quotas.

Observe = one pipelined ACL GETUSER per tenant (a single round trip); apply =
ACL SETUSER with `reset` first, so removed rights really disappear, then ACL SAVE
when Redis has an aclfile. Usage is measured by one bounded SCAN walk over the
keyspace per pass (not one per tenant), resumed where the last pass stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from dynabase.desired.redis import ObservedAcl, RedisTarget, command_rules

CANONICAL_KEY = "dynabase:redis:acl-canonical:{variant}"
PROBE_USER = "dynabase_probe"


@dataclass
class Census:
    """A walk over the keyspace, counting keys and sampling memory per tenant prefix."""

    cursor: int = 0
    keys: dict[str, int] = field(default_factory=dict)
    sampled_bytes: dict[str, int] = field(default_factory=dict)
    sampled_keys: dict[str, int] = field(default_factory=dict)
    done: dict[str, tuple[int, int]] = field(default_factory=dict)  # last complete: prefix -> (keys, bytes)


class RedisBackend:
    name = "redis"

    def __init__(self, redis_url: str, *, scan_budget: int = 50, scan_count: int = 1000) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.scan_budget = scan_budget
        self.scan_count = scan_count
        self.census = Census()
        self.writes = 0
        self._canonical: dict[bool, str] = {}
        self.known_prefixes: set[str] = set()  # every tenant seen, so partial passes share one census

    async def close(self) -> None:
        await self._redis.aclose()

    async def _cmd(self, *args: str) -> Any:
        return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    async def canonical_commands(self, read_only: bool) -> str:
        """How this Redis writes our command rules back: learned once, remembered in Redis."""
        if read_only in self._canonical:
            return self._canonical[read_only]
        rules = command_rules(read_only)
        variant = hashlib.sha256(" ".join(rules).encode()).hexdigest()[:16]
        cached = await self._redis.get(CANONICAL_KEY.format(variant=variant))
        if cached is None:
            await self._cmd("ACL", "SETUSER", PROBE_USER, "reset", "off", *rules)
            info = await self._cmd("ACL", "GETUSER", PROBE_USER)
            await self._cmd("ACL", "DELUSER", PROBE_USER)
            cached = str(_as_dict(info)["commands"])
            await self._redis.set(CANONICAL_KEY.format(variant=variant), cached)
        self._canonical[read_only] = str(cached)
        return str(cached)

    async def observe(self, usernames: list[str]) -> dict[str, ObservedAcl | None]:
        if not usernames:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in usernames:
                pipe.execute_command("ACL", "GETUSER", name)
            replies = await pipe.execute(raise_on_error=False)
        out: dict[str, ObservedAcl | None] = {}
        for name, reply in zip(usernames, replies, strict=True):
            if reply is None or isinstance(reply, Exception):
                out[name] = None
                continue
            info = _as_dict(reply)
            out[name] = ObservedAcl(
                flags=tuple(info.get("flags") or ()),
                passwords=tuple(info.get("passwords") or ()),
                commands=str(info.get("commands", "")),
                keys=str(info.get("keys", "")),
                channels=str(info.get("channels", "")),
            )
        return out

    async def apply(self, target: RedisTarget) -> None:
        if target.present:
            await self._cmd("ACL", "SETUSER", target.username, *target.setuser_args())
        else:
            await self._cmd("ACL", "DELUSER", target.username)
        self.writes += 1

    async def persist(self) -> None:
        """ACL SAVE when Redis was started with an aclfile (otherwise rules live in redis.conf/memory)."""
        with contextlib.suppress(aioredis.ResponseError):
            aclfile = await self._redis.config_get("aclfile")
            if aclfile.get("aclfile"):
                await self._cmd("ACL", "SAVE")

    async def drop_keys(self, prefix: str, batch: int = 500) -> int:
        removed = 0
        async for chunk in _batched(self._redis.scan_iter(match=f"{_escape(prefix)}*", count=1000), batch):
            removed += int(await self._redis.unlink(*chunk))
        return removed

    async def walk(self, prefixes: list[str]) -> None:
        """Advance the census by a bounded number of SCAN steps."""
        census = self.census
        ordered = sorted(prefixes, key=len, reverse=True)
        for _ in range(self.scan_budget):
            cursor, keys = await self._redis.scan(cursor=census.cursor, count=self.scan_count)
            sample: list[tuple[str, str]] = []
            for raw in keys:
                key = str(raw)
                owner = next((p for p in ordered if key.startswith(p)), None)
                if owner is None:
                    continue
                census.keys[owner] = census.keys.get(owner, 0) + 1
                if census.sampled_keys.get(owner, 0) < 20:
                    sample.append((owner, key))
            if sample:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for _, key in sample:
                        pipe.memory_usage(key)
                    sizes = await pipe.execute(raise_on_error=False)
                for (owner, _), size in zip(sample, sizes, strict=True):
                    if isinstance(size, int):
                        census.sampled_bytes[owner] = census.sampled_bytes.get(owner, 0) + size
                        census.sampled_keys[owner] = census.sampled_keys.get(owner, 0) + 1
            census.cursor = int(cursor)
            if census.cursor == 0:
                census.done = {
                    p: (census.keys.get(p, 0), _estimate(census, p)) for p in prefixes
                }
                census.keys, census.sampled_bytes, census.sampled_keys = {}, {}, {}
                return

    def usage(self, prefix: str) -> tuple[int | None, int | None]:
        if prefix not in self.census.done:
            return None, None
        keys, memory = self.census.done[prefix]
        return keys, memory


def _estimate(census: Census, prefix: str) -> int:
    sampled = census.sampled_keys.get(prefix, 0)
    if not sampled:
        return 0
    return census.sampled_bytes.get(prefix, 0) * census.keys.get(prefix, 0) // sampled


def _as_dict(reply: Any) -> dict[str, Any]:
    if isinstance(reply, dict):
        return reply
    items = list(reply)
    return {str(items[i]): items[i + 1] for i in range(0, len(items), 2)}


def _escape(prefix: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)


async def _batched(iterator: Any, size: int) -> Any:
    chunk: list[str] = []
    async for item in iterator:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
