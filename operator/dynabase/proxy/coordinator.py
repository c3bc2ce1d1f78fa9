"""The proxy's link to Redis (coordination.Coordination): limits (hash + channel), pool
ports, replica count, token leases, cancel keys, wake-ups and usage flushes. Nothing here
runs per query. Key names and JSON: dynabase.keyspace.

If Redis goes away the proxy keeps serving from its last copy of the limits and
switches every limiter to its local share (qps / replicas), adding no latency;
the `dynabase_proxy_redis_up` gauge says so. After a reconnect it reloads all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge

from dynabase.keyspace import (
    ACTIVITY_KEY,
    AGENTS_KEY,
    CANCEL_TTL,
    LIMITS_CHANNEL,
    LIMITS_KEY,
    REPLICA_TTL,
    REPLICAS_KEY,
    USAGE_TTL,
    WAKE_CHANNEL,
    cancel_key,
    changed_databases,
    decode_agent_report,
    decode_cancel_target,
    decode_limits_table,
    encode_cancel_target,
    encode_usage,
    lease_key,
    usage_field,
    usage_key,
)

from .coordination import BackendKey, Target
from .limiter import LEASE_SCRIPT
from .metering import HourlyMeter
from .tenants import Tenants

log = logging.getLogger(__name__)
REDIS_UP = Gauge("dynabase_proxy_redis_up", "1 while the proxy reaches Redis; 0 = enforcing locally.")
LEASES = Gauge("dynabase_proxy_redis_leases", "Token leases requested from Redis so far.")


class Coordinator:
    def __init__(self, redis_url: str, *, replica_id: str, agent_id: str | None, flush_interval: float = 1.0) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=2,
                                             socket_connect_timeout=2)
        self.replica_id = replica_id
        self.agent_id = agent_id
        self.flush_interval = flush_interval
        self.connected = False
        self.meter = HourlyMeter()
        self.lease_calls = 0
        self.flushes = 0
        self._lease = self.redis.register_script(LEASE_SCRIPT)
        self._queries_seen: dict[str, int] = {}
        self._last_active: dict[str, float] = {}  # database -> when this replica last saw a query
        # Redis lost this replica's writes (restarted without its data, or a long outage): the next
        # flush writes again all it still knows (the last ended hour, every tenant's last activity).
        self._rewrite_owed = False
        self._registered = False  # in the replica registry once; missing later means Redis lost it
        self._cancel_keys: dict[BackendKey, tuple[str, float]] = {}  # -> (target, written at)
        self._cancel_gone: list[BackendKey] = []  # closed: deleted with the next flush
        self._tasks: set[asyncio.Task[None]] = set()
        self.tenants = Tenants(self)  # the registry this coordinator keeps current (server.Proxy serves it)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- limits ---------------------------------------------------------------------------

    async def load_all(self) -> None:
        raw = await self.redis.hgetall(LIMITS_KEY)
        if not raw and self.tenants.limits:
            # Gone, not emptied (the engine removes tenants one by one): Redis lost its data. The last
            # copy holds, restrictions included, until the engine publishes again.
            log.warning("proxy limits missing in Redis; serving the last copy until they are published again",
                        extra={"tenants": len(self.tenants.limits)})
            return
        table, unreadable = decode_limits_table({str(k): str(v) for k, v in raw.items()})
        _log_unreadable(unreadable)
        self.tenants.limits = table

    async def load_some(self, databases: list[str]) -> None:
        values = await self.redis.hmget(LIMITS_KEY, databases)
        found = {database: str(text) for database, text in zip(databases, values, strict=True) if text is not None}
        decoded, unreadable = decode_limits_table(found)
        _log_unreadable(unreadable)  # such a tenant keeps the limits it had
        table = dict(self.tenants.limits)
        for database in databases:
            if database not in found:
                table.pop(database, None)
        table.update(decoded)
        self.tenants.limits = table

    async def look_up(self, database: str) -> None:
        try:
            await self.load_some([database])
        except (aioredis.RedisError, OSError) as exc:  # refused as unknown; the watcher reconnects
            log.warning("tenant lookup failed", extra={"database": database, "error": str(exc)})

    async def refresh_topology(self) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(REPLICAS_KEY, {self.replica_id: now})
            pipe.zremrangebyscore(REPLICAS_KEY, 0, now - REPLICA_TTL)
            pipe.zcard(REPLICAS_KEY)
            pipe.hgetall(AGENTS_KEY)
            added, _, replicas, agents = await pipe.execute()
        if added and self._registered:
            # This replica was not in the registry: Redis lost it (a restart without its data, or an
            # outage longer than REPLICA_TTL). A reconnect may have been silent, so reload the limits
            # and write again what Redis may have lost.
            self._rewrite_owed = True
            await self.load_all()
        self._registered = True
        ports: dict[str, int] = {}
        for agent_id, text in agents.items():
            if self.agent_id and agent_id != self.agent_id:
                continue
            for pool, port in decode_agent_report(str(agent_id), str(text)).ports().items():
                ports.setdefault(pool, port)
        if ports:
            self.tenants.pool_ports = ports
        self.tenants.set_replicas(int(replicas))
        self.tenants.changes.notify()  # pool ports and replicas are part of what serves() waits for

    async def watch(self, stop: asyncio.Event) -> None:
        """Subscribe to limit changes; on any Redis trouble, reconnect and reload everything."""
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(LIMITS_CHANNEL)
                await self.load_all()
                await self.refresh_topology()
                self._set_connected(True)
                self.tenants.applied(list(self.tenants.states))
                last_topology = time.monotonic()
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        names = changed_databases(str(message["data"]))
                        await self.load_some(names)
                        self.tenants.applied(names)
                    if time.monotonic() - last_topology >= 1.0:
                        await self.refresh_topology()
                        last_topology = time.monotonic()
            except (aioredis.RedisError, OSError) as exc:
                self._set_connected(False)
                log.warning("redis unavailable; enforcing limits locally", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _set_connected(self, ok: bool) -> None:
        if self.connected == ok:
            return
        self.connected = ok
        REDIS_UP.set(1 if ok else 0)
        if not ok:
            self.tenants.release_waiters()  # queries waiting on a lease decide again, locally
        self.tenants.changes.notify()

    # -- token leases -------------------------------------------------------------------------

    async def lease(self, owner: str, lanes: int, args: list[float]) -> list[int] | None:
        self.lease_calls += 1
        LEASES.set(self.lease_calls)
        try:
            reply = await self._lease(keys=[lease_key(owner, lanes)], args=args)
        except (aioredis.RedisError, OSError) as exc:
            # The watcher reconnects; until then every limiter admits from its local share.
            log.warning("QPS lease failed; enforcing limits locally", extra={"error": str(exc)})
            self._set_connected(False)
            return None
        return [int(value) for value in reply]

    # -- CancelRequests across replicas ------------------------------------------------------

    def publish_cancel(self, backend_key: BackendKey, target: Target) -> None:
        """Written at once (one SET in its own task) so a cancel in the first second works too."""
        value = encode_cancel_target(target)
        self._cancel_keys[backend_key] = (value, time.monotonic())
        self._spawn(self._write_cancel(backend_key, value))

    async def _write_cancel(self, backend_key: BackendKey, value: str) -> None:
        try:
            await self.redis.set(cancel_key(*backend_key), value, ex=CANCEL_TTL)
        except (aioredis.RedisError, OSError):
            if backend_key in self._cancel_keys:
                self._cancel_keys[backend_key] = (value, 0.0)  # the next flush writes it

    def forget_cancel(self, backend_key: BackendKey) -> None:
        if self._cancel_keys.pop(backend_key, None) is not None:
            self._cancel_gone.append(backend_key)

    async def find_cancel(self, backend_key: BackendKey) -> Target | None:
        try:
            value = await self.redis.get(cancel_key(*backend_key))
        except (aioredis.RedisError, OSError):
            return None
        return decode_cancel_target(str(value)) if value else None

    def _queue_cancel_updates(self, pipe: Any) -> tuple[list[BackendKey], list[BackendKey]]:
        """Queue rewrites of keys half-way to expiry and deletes of closed connections' keys;
        returns both lists, to undo the bookkeeping if the flush fails."""
        now = time.monotonic()
        renewed = [k for k, (_, written) in self._cancel_keys.items() if written <= now - CANCEL_TTL / 2]
        for backend_key in renewed:
            value = self._cancel_keys[backend_key][0]
            pipe.set(cancel_key(*backend_key), value, ex=CANCEL_TTL)
            self._cancel_keys[backend_key] = (value, now)
        gone, self._cancel_gone = self._cancel_gone, []
        if gone:
            pipe.delete(*(cancel_key(*k) for k in gone))
        return renewed, gone

    def _cancel_updates_failed(self, renewed: list[BackendKey], gone: list[BackendKey]) -> None:
        for backend_key in renewed:
            if backend_key in self._cancel_keys:
                self._cancel_keys[backend_key] = (self._cancel_keys[backend_key][0], 0.0)
        self._cancel_gone.extend(gone)

    # -- wake-ups and usage ----------------------------------------------------------------------

    def wake(self, database: str) -> None:
        self._spawn(self._wake(database))

    async def _wake(self, database: str) -> None:
        with contextlib.suppress(aioredis.RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(ACTIVITY_KEY, {database: time.time()}, gt=True)
                pipe.publish(WAKE_CHANNEL, database)
                await pipe.execute()
            log.info("woke a cold tenant", extra={"database": database})

    async def flush(self) -> None:
        """Absolute per-hour values per replica: idempotent, so a retry never double-counts.
        Returns once Redis has them (or raises)."""
        self.tenants.meter()
        now = time.time()
        rewrite = self._rewrite_owed
        by_hour: dict[int, dict[Any, Any]] = {}
        active: dict[str, float] = {}
        counts: dict[str, int] = {}
        for database, state in self.tenants.states.items():
            usage = state.usage
            field = usage_field(usage.tenant, self.replica_id)
            for hour, counters in self.meter.per_hour(usage, now, again=rewrite):
                by_hour.setdefault(hour, {})[field] = encode_usage(counters, usage.tier)
            counts[database] = usage.queries
            if self._queries_seen.get(database) != usage.queries:
                active[database] = now
        if rewrite:
            active = {**self._last_active, **active}
        async with self.redis.pipeline(transaction=False) as pipe:
            renewed, gone = self._queue_cancel_updates(pipe)
            if active:
                # GT keeps the latest time across replicas: the last query anywhere counts.
                pipe.zadd(ACTIVITY_KEY, active, gt=True)
            for hour, fields in by_hour.items():
                key = usage_key(hour)
                pipe.hset(key, mapping=fields)
                pipe.expire(key, USAGE_TTL)
            if len(pipe) == 0:
                return
            try:
                await pipe.execute()
            except (aioredis.RedisError, OSError):
                self._cancel_updates_failed(renewed, gone)
                raise
        self.meter.flushed()
        self._queries_seen.update(counts)
        self._last_active.update(active)
        if rewrite:
            self._rewrite_owed = False
        self.flushes += 1

    async def flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_interval)
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self.flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()


def _log_unreadable(unreadable: dict[str, str]) -> None:
    for database, why in unreadable.items():
        log.warning("unreadable proxy limits in Redis", extra={"database": database, "error": why})
