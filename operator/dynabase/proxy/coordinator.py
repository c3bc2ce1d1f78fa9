"""The proxy's link to Redis: limits (hash + channel), pool ports, replica count,
token leases and usage flushes. Nothing here runs per query.

If Redis goes away the proxy keeps serving from its last copy of the limits and
switches every limiter to its local share (qps / replicas), adding no latency;
the `dynabase_proxy_redis_up` gauge says so. After a reconnect it reloads all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge

from dynabase.desired.pgbouncer import AGENTS_KEY
from dynabase.desired.proxy import ACTIVITY_KEY, LIMITS_CHANNEL, LIMITS_KEY, WAKE_CHANNEL, ProxyTenantLimits

from .limiter import LEASE_SCRIPT, lease_ahead, lease_reply
from .metering import USAGE_KEY, HourlyMeter, encode, usage_field
from .server import Proxy, TenantState

log = logging.getLogger(__name__)
REPLICAS_KEY = "dynabase:proxy:replicas"
# A hash of lane -> next free slot (the GCRA schedule, in lanes; see limiter.py).
LEASE_KEY = "dynabase:qps:{database}:lanes{lanes}"
# A client's backend key -> "host:port" of the PgBouncer that issued it, so a CancelRequest
# reaching any replica finds it. Rewritten while the connection lives, deleted at its close.
CANCEL_KEY = "dynabase:proxy:cancel:{pid}:{key}"
CANCEL_TTL = 600  # seconds; a replica that dies without cleaning up leaves nothing for longer
REDIS_UP = Gauge("dynabase_proxy_redis_up", "1 while the proxy reaches Redis; 0 = enforcing locally.")
LEASES = Gauge("dynabase_proxy_redis_leases", "Token leases requested from Redis so far.")


class Coordinator:
    def __init__(self, proxy: Proxy, redis_url: str, *, replica_id: str, agent_id: str | None,
                 flush_interval: float = 1.0) -> None:
        self.proxy = proxy
        self.redis = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=2,
                                             socket_connect_timeout=2)
        self.replica_id = replica_id
        self.agent_id = agent_id
        self.flush_interval = flush_interval
        self.meter = HourlyMeter()
        self.lease_calls = 0
        self.flushes = 0
        self._lease = self.redis.register_script(LEASE_SCRIPT)
        self._queries_seen: dict[str, int] = {}
        self._cancel_keys: dict[tuple[int, int], tuple[str, float]] = {}  # -> (target, written at)
        self._cancel_gone: list[tuple[int, int]] = []  # closed: deleted with the next flush
        proxy.lease = self.lease
        proxy.wake = self.wake
        proxy.publish_cancel = self.publish_cancel
        proxy.forget_cancel = self.forget_cancel
        proxy.find_cancel = self.find_cancel

    # -- limits ---------------------------------------------------------------------------

    async def load_all(self) -> None:
        raw = await self.redis.hgetall(LIMITS_KEY)
        table: dict[str, ProxyTenantLimits] = {}
        for database, text in raw.items():
            with contextlib.suppress(TypeError, ValueError):
                table[str(database)] = ProxyTenantLimits.from_json(str(text))
        self.proxy.router.limits = table

    async def load_some(self, databases: list[str]) -> None:
        values = await self.redis.hmget(LIMITS_KEY, databases)
        table = dict(self.proxy.router.limits)
        for database, text in zip(databases, values, strict=True):
            if text is None:
                table.pop(database, None)
            else:
                with contextlib.suppress(TypeError, ValueError):
                    table[database] = ProxyTenantLimits.from_json(str(text))
        self.proxy.router.limits = table

    async def refresh_topology(self) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(REPLICAS_KEY, {self.replica_id: now})
            pipe.zremrangebyscore(REPLICAS_KEY, 0, now - 5)
            pipe.zcard(REPLICAS_KEY)
            pipe.hgetall(AGENTS_KEY)
            _, _, replicas, agents = await pipe.execute()
        self.proxy.router.replicas = max(1, int(replicas))
        ports: dict[str, int] = {}
        for agent_id, text in agents.items():
            if self.agent_id and agent_id != self.agent_id:
                continue
            for pool, report in json.loads(text).get("pools", {}).items():
                ports.setdefault(pool, int(report["port"]))
        if ports:
            self.proxy.router.pool_ports = ports
        for state in self.proxy.tenants.values():
            if state.limiter is not None:
                state.limiter.set_replicas(self.proxy.router.replicas)
        self.proxy.routing_changed()

    async def watch(self, stop: asyncio.Event) -> None:
        """Subscribe to limit changes; on any Redis trouble, reconnect and reload everything."""
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(LIMITS_CHANNEL)
                await self.load_all()
                self.proxy.limits_updated(list(self.proxy.tenants))
                await self.refresh_topology()
                self._set_redis(True)
                last_topology = time.monotonic()
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        names = [n for n in str(message["data"]).split(",") if n]
                        await self.load_some(names)
                        self.proxy.limits_updated(names)
                    if time.monotonic() - last_topology >= 1.0:
                        await self.refresh_topology()
                        last_topology = time.monotonic()
            except (aioredis.RedisError, OSError) as exc:
                self._set_redis(False)
                log.warning("redis unavailable; enforcing limits locally", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _set_redis(self, ok: bool) -> None:
        if self.proxy.redis_ok != ok:
            self.proxy.redis_ok = ok
            REDIS_UP.set(1 if ok else 0)
            if not ok:
                for state in self.proxy.tenants.values():
                    # Wake queries waiting on a lease: they re-decide locally.
                    for waiter in list(state.waiters):
                        state.waiters.remove(waiter)
                        waiter.release()

    # -- token leases -------------------------------------------------------------------------

    def lease(self, state: TenantState) -> None:
        limiter = state.limiter
        if limiter is None or limiter.leasing:
            return
        limiter.leasing = True
        self.proxy.spawn(self._lease_task(state))

    async def _lease_task(self, state: TenantState) -> None:
        limiter = state.limiter
        assert limiter is not None
        limits = state.limits
        ahead = lease_ahead(limits.over_limit == "throttle", limits.queue_timeout_ms / 1000)
        sent, wall = time.monotonic(), time.time()
        want = limiter.lease_size(sent)
        key = LEASE_KEY.format(database=limits.database, lanes=limiter.lanes)
        try:
            self.lease_calls += 1
            LEASES.set(self.lease_calls)
            reply = await self._lease(keys=[key], args=limiter.lease_args(int(wall * 1_000_000), want, ahead))
        except (aioredis.RedisError, OSError):
            limiter.leasing = False
            self._set_redis(False)
            return
        grants, wait = lease_reply(reply, sent)  # slots placed on this clock
        self._grant(state, grants, wait, want, ahead)

    def _grant(self, state: TenantState, grants: list[tuple[int, int, float]], wait: float, want: int,
               ahead: float) -> None:
        limiter = state.limiter
        if limiter is None:
            return
        limiter.leasing = False
        now = time.monotonic()
        limiter.settle(grants, wait, want, now, ahead)
        # Held queries decide again: with slots each finds its own (and waits for it, or is
        # refused if it falls due too late); without, they wait for the schedule to have room.
        waiters, state.waiters = state.waiters, []
        retry = limiter.next_free - now
        for waiter in waiters:
            if grants or retry <= 0:
                waiter.release()
            elif now + retry > waiter.hold_deadline:
                waiter.release(reject=True)
            else:
                asyncio.get_running_loop().call_later(retry, waiter.release)

    # -- CancelRequests across replicas ------------------------------------------------------

    def publish_cancel(self, backend_key: tuple[int, int], target: tuple[str, int]) -> None:
        """Written at once (one SET in its own task) so a cancel in the first second works too."""
        value = f"{target[0]}:{target[1]}"
        self._cancel_keys[backend_key] = (value, time.monotonic())
        self.proxy.spawn(self._write_cancel(backend_key, value))

    async def _write_cancel(self, backend_key: tuple[int, int], value: str) -> None:
        try:
            await self.redis.set(_cancel_key(backend_key), value, ex=CANCEL_TTL)
        except (aioredis.RedisError, OSError):
            if backend_key in self._cancel_keys:
                self._cancel_keys[backend_key] = (value, 0.0)  # the next flush writes it

    def forget_cancel(self, backend_key: tuple[int, int]) -> None:
        if self._cancel_keys.pop(backend_key, None) is not None:
            self._cancel_gone.append(backend_key)

    async def find_cancel(self, pid: int, key: int) -> tuple[str, int] | None:
        try:
            value = await self.redis.get(_cancel_key((pid, key)))
        except (aioredis.RedisError, OSError):
            return None
        if not value:
            return None
        host, _, port = str(value).rpartition(":")
        return (host, int(port)) if host and port.isdigit() else None

    def _queue_cancel_updates(self, pipe: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Queue rewrites of keys half-way to expiry and deletes of closed connections' keys;
        returns both lists, to undo the bookkeeping if the flush fails."""
        now = time.monotonic()
        renewed = [k for k, (_, written) in self._cancel_keys.items() if written <= now - CANCEL_TTL / 2]
        for backend_key in renewed:
            value = self._cancel_keys[backend_key][0]
            pipe.set(_cancel_key(backend_key), value, ex=CANCEL_TTL)
            self._cancel_keys[backend_key] = (value, now)
        gone, self._cancel_gone = self._cancel_gone, []
        if gone:
            pipe.delete(*(_cancel_key(k) for k in gone))
        return renewed, gone

    def _cancel_updates_failed(self, renewed: list[tuple[int, int]], gone: list[tuple[int, int]]) -> None:
        for backend_key in renewed:
            if backend_key in self._cancel_keys:
                self._cancel_keys[backend_key] = (self._cancel_keys[backend_key][0], 0.0)
        self._cancel_gone.extend(gone)

    # -- usage ------------------------------------------------------------------------------

    def wake(self, database: str) -> None:
        self.proxy.spawn(self._wake(database))

    async def _wake(self, database: str) -> None:
        with contextlib.suppress(aioredis.RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(ACTIVITY_KEY, {database: time.time()}, gt=True)
                pipe.publish(WAKE_CHANNEL, database)
                await pipe.execute()
            log.info("woke a cold tenant", extra={"database": database})

    async def flush(self) -> None:
        """Absolute per-hour values per replica: idempotent, so a retry never double-counts."""
        now = time.time()
        by_hour: dict[int, dict[Any, Any]] = {}
        active: dict[str, float] = {}
        counts: dict[str, int] = {}
        for database, state in self.proxy.tenants.items():
            hour, values = self.meter.per_hour(state.usage, now)
            by_hour.setdefault(hour, {})[usage_field(state.usage.tenant, self.replica_id)] = encode(
                values, state.usage.tier
            )
            counts[database] = state.usage.queries
            if self._queries_seen.get(database) != state.usage.queries:
                active[database] = now
        async with self.redis.pipeline(transaction=False) as pipe:
            renewed, gone = self._queue_cancel_updates(pipe)
            if active:
                # GT keeps the latest time across replicas: the last query anywhere counts.
                pipe.zadd(ACTIVITY_KEY, active, gt=True)
            for hour, fields in by_hour.items():
                key = USAGE_KEY.format(hour=hour)
                pipe.hset(key, mapping=fields)
                pipe.expire(key, 8 * 24 * 3600)
            if len(pipe) == 0:
                return
            try:
                await pipe.execute()
            except (aioredis.RedisError, OSError):
                self._cancel_updates_failed(renewed, gone)
                raise
        self._queries_seen.update(counts)
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
        await self.redis.aclose()


def _cancel_key(backend_key: tuple[int, int]) -> str:
    return CANCEL_KEY.format(pid=backend_key[0], key=backend_key[1])
