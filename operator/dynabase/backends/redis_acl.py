"""Redis backend: one ACL user per tenant, and a keyspace census for quotas.

The tenants' command allowlist is derived from the server's `COMMAND INFO`
(desired.redis_commands), again whenever the server's run_id changes (a restart,
maybe another version). Observe = one pipelined ACL GETUSER per tenant (a single
round trip), skipped for users known unchanged (the server's count of ACL writes
moved only by ours); apply = ACL SETUSER with `reset` first, so removed rights really
disappear, then ACL SAVE when Redis has an aclfile. Usage is measured by one
bounded SCAN walk over the keyspace per pass (not one per tenant), resumed where
the last pass stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dynabase.desired.redis import ObservedAcl, RedisTarget, command_rules, comparable_commands
from dynabase.desired.redis_commands import TenantCommands, parse_command_info

# How a server describes the same rules depends on its command table (which categories it
# names): learned per server process.
CANONICAL_KEY = "dynabase:redis:acl-canonical:{run_id}:{variant}"
CANONICAL_TTL_SECONDS = 30 * 86400
# The commands that change ACL users. While the server's count of them moved only by our
# own writes, the users observed before are as they were: no ACL GETUSER needed (which,
# for an allowlist of ~200 commands, costs Redis 7.0 a millisecond or more per user).
ACL_WRITE_STATS = ("cmdstat_acl|setuser", "cmdstat_acl|deluser", "cmdstat_acl|load")
# One probe user per probe: two operator processes probing at once must not read each other's rules.
PROBE_USER = "dynabase_probe_{nonce}"


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
        # One retry on a fresh connection: after a Redis restart the pooled ones are dead.
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1),
                                              retry_on_error=[RedisConnectionError])
        # COMMAND INFO raw: redis-py's parser keeps neither subcommands' key specs nor their shape.
        self._redis.set_response_callback("COMMAND", _raw_reply)
        self.scan_budget = scan_budget
        self.scan_count = scan_count
        self.census = Census()
        self.writes = 0
        self._canonical: dict[bool, str] = {}
        self._commands: TenantCommands | None = None
        self._run_id: str | None = None
        self._observed: dict[str, ObservedAcl | None] = {}  # valid while nobody else writes ACLs
        self._acl_write_count: int | None = None  # the server's, when last observed
        self._own_acl_writes = 0  # since then
        self.known_prefixes: set[str] = set()  # every tenant seen, so partial passes share one census

    async def close(self) -> None:
        await self._redis.aclose()

    async def _cmd(self, *args: str) -> Any:
        return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    async def tenant_commands(self) -> TenantCommands:
        """The tenant allowlist for this server's command table, learned once."""
        if self._commands is None:
            self._commands = TenantCommands.from_server(parse_command_info(await self._cmd("COMMAND", "INFO")))
        return self._commands

    def forget_commands(self) -> None:
        """Learn the command table again (the server may have been replaced by another version)."""
        self._commands = None
        self._canonical.clear()

    def _seen_server(self, server_info: Any) -> None:
        run_id = server_info.get("run_id") if isinstance(server_info, dict) else None
        if run_id is None:
            return
        if self._run_id is not None and str(run_id) != self._run_id:
            self.forget_commands()
            self._observed.clear()
        self._run_id = str(run_id)

    def _seen_acl_writes(self, stats: Any) -> None:
        """Forget what was observed if anyone but us changed ACL users since (or we cannot tell)."""
        count = sum(int((stats.get(name) or {}).get("calls", 0)) for name in ACL_WRITE_STATS) \
            if isinstance(stats, dict) else None
        if count is None or self._acl_write_count is None or count != self._acl_write_count + self._own_acl_writes:
            self._observed.clear()
        self._acl_write_count, self._own_acl_writes = count, 0

    async def canonical_commands(self, read_only: bool) -> str:
        """How this Redis writes our command rules back: learned once per server process, remembered in Redis."""
        if read_only in self._canonical:
            return self._canonical[read_only]
        if self._run_id is None:
            self._seen_server(await self._redis.info("server"))
        rules = command_rules(read_only, await self.tenant_commands())
        variant = hashlib.sha256(" ".join(rules).encode()).hexdigest()[:16]
        key = CANONICAL_KEY.format(run_id=self._run_id, variant=variant)
        cached = await self._redis.get(key)
        if cached is None:
            probe = PROBE_USER.format(nonce=secrets.token_hex(6))
            await self._cmd("ACL", "SETUSER", probe, "reset", "off", *rules)
            try:
                info = await self._cmd("ACL", "GETUSER", probe)
            finally:
                await self._cmd("ACL", "DELUSER", probe)
            self._own_acl_writes += 2
            cached = comparable_commands(str(_as_dict(info)["commands"]))
            await self._redis.set(key, cached, ex=CANONICAL_TTL_SECONDS)
        self._canonical[read_only] = str(cached)
        return str(cached)

    async def observe(self, usernames: list[str]) -> dict[str, ObservedAcl | None]:
        """Each user's ACL: one round trip for the server's run_id and ACL write count, a second for
        ACL GETUSER of the users not known unchanged since the last observation."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.info("commandstats")
            server, stats = await pipe.execute(raise_on_error=False)
        self._seen_server(server)
        self._seen_acl_writes(stats)
        unknown = [name for name in usernames if name not in self._observed]
        if unknown:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in unknown:
                    pipe.execute_command("ACL", "GETUSER", name)
                replies = await pipe.execute(raise_on_error=False)
            for name, reply in zip(unknown, replies, strict=True):
                if isinstance(reply, Exception):
                    raise reply
                self._observed[name] = None if reply is None else _observed_acl(_as_dict(reply))
        return {name: self._observed[name] for name in usernames}

    async def apply(self, target: RedisTarget) -> None:
        if target.present:
            rules = command_rules(target.read_only, await self.tenant_commands())
            try:
                await self._cmd("ACL", "SETUSER", target.username, *target.setuser_args(rules))
            except aioredis.ResponseError:
                self.forget_commands()  # e.g. a command the server no longer knows: re-derive next pass
                raise
        else:
            await self._cmd("ACL", "DELUSER", target.username)
        self._observed.pop(target.username, None)  # observed afresh next time
        self._own_acl_writes += 1
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


def _observed_acl(info: dict[str, Any]) -> ObservedAcl:
    return ObservedAcl(
        flags=tuple(info.get("flags") or ()),
        passwords=tuple(info.get("passwords") or ()),
        commands=comparable_commands(str(info.get("commands", ""))),
        keys=str(info.get("keys", "")),
        channels=str(info.get("channels", "")),
    )


def _raw_reply(response: Any, **kwargs: Any) -> Any:
    return response


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
