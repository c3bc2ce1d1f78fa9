"""PgBouncer backend: publish the pool layout for the agents, read their reports.

Observe = read what is published and what each agent last applied; apply = one
SET + PUBLISH when the layout changed (nothing when it did not). Confirmation
comes from the agents, which compare PgBouncer's live SHOW output with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dynabase.desired.pgbouncer import DEFAULT_POOL, PgBouncerDesired
from dynabase.keyspace import AGENTS_KEY, LAYOUT_CHANNEL, LAYOUT_KEY, LAYOUT_SEQ_KEY, AgentReport, decode_agent_report

AGENT_STALE_SECONDS = 30.0
LAYOUT_LOCK_KEY = "dynabase:pgbouncer:lock"  # held by one engine while it reads, patches and publishes
_LOCK_TTL_MS = 15_000  # a holder that died frees it after this
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class PgBouncerObserved:
    published: PgBouncerDesired | None
    agents: list[AgentReport]


class PgBouncerBackend:
    name = "pgbouncer"

    def __init__(self, redis_url: str, *, confirm_timeout: float = 10.0) -> None:
        # One retry on a fresh connection: after a Redis restart the pooled ones are dead.
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1),
                                              retry_on_error=[RedisConnectionError])
        self.confirm_timeout = confirm_timeout
        self.writes = 0

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.asynccontextmanager
    async def layout_lock(self) -> AsyncIterator[None]:
        """One engine at a time reads, patches and publishes the layout.

        Operator shards (and a `dynabase apply` beside them) each patch their own
        tenants into the one shared layout; without this, two read-modify-writes
        at once would drop one engine's new routes.
        """
        token, pause = secrets.token_hex(8), 0.002
        deadline = time.monotonic() + _LOCK_TTL_MS / 1000
        while not await self._redis.set(LAYOUT_LOCK_KEY, token, nx=True, px=_LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise TimeoutError("the PgBouncer layout lock stayed taken; is another engine stuck publishing?")
            await asyncio.sleep(pause)
            pause = min(0.05, pause * 2)
        try:
            yield
        finally:
            await self._redis.eval(_RELEASE, 1, LAYOUT_LOCK_KEY, token)

    async def observe(self) -> PgBouncerObserved:
        published_text = await self._redis.get(LAYOUT_KEY)
        published = PgBouncerDesired.from_json(str(published_text)) if published_text else None
        return PgBouncerObserved(published, await self._agents())

    async def _agents(self) -> list[AgentReport]:
        raw = await self._redis.hgetall(AGENTS_KEY)
        now = time.time()
        reports = [decode_agent_report(str(agent_id), str(text)) for agent_id, text in raw.items()]
        return [r for r in reports if now - r.at <= AGENT_STALE_SECONDS]

    async def publish(self, desired: PgBouncerDesired, version: str) -> int:
        """Publish a layout; returns its sequence number."""
        seq = int(await self._redis.incr(LAYOUT_SEQ_KEY))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(LAYOUT_KEY, desired.to_json(version, seq))
            pipe.publish(LAYOUT_CHANNEL, version)
            await pipe.execute()
        self.writes += 1
        return seq

    async def route(self, database: str) -> tuple[str, int] | None:
        """(pool, port) that serves ``database`` on the first live agent, or None."""
        observed = await self.observe()
        if observed.published is None or not observed.agents:
            return None
        route = observed.published.routes.get(database)
        pool = route.pool if route else DEFAULT_POOL
        report = observed.agents[0].pools.get(pool)
        return (pool, report.port) if report else None

    async def wait_confirmed(self, seq: int) -> list[AgentReport]:
        """Agents' reports once all live agents applied publication ``seq`` or a newer one."""
        deadline = time.monotonic() + self.confirm_timeout
        pause = 0.002  # agents answer in milliseconds; a sign-up's pass waits for this one
        while True:
            agents = await self._agents()
            if agents and all(a.seq >= seq for a in agents):
                return agents
            if time.monotonic() >= deadline:
                return agents
            await asyncio.sleep(pause)
            pause = min(0.05, pause * 2)
