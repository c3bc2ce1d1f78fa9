"""Queries-per-second limiting: a local GCRA decides in well under a microsecond;
replicas share one budget by leasing batches of tokens from Redis.

Redis keeps a GCRA per tenant (its "theoretical arrival time"); a lease takes up
to ``batch`` tokens at once, so the Redis cost per admitted query is 1/batch.
When Redis is unreachable each replica enforces qps / replicas locally.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# KEYS[1] tenant key; ARGV: now_ms, interval_us, tolerance_us, want, max_wait_us.
# Returns {granted, wait_us}: `granted` tokens usable after `wait_us` (a reservation,
# so a throttled replica holds its queries instead of asking again and again), or
# {0, wait_us} when even the first token is further away than max_wait_us.
LEASE_SCRIPT = """
local now = tonumber(ARGV[1]) * 1000
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local max_wait = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval) + 1
if room >= want or (room > 0 and max_wait <= 0) then
  local granted = math.min(want, room)
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  return {granted, 0}
end
local new_tat = tat + want * interval
local wait = new_tat - tolerance - now
if wait <= max_wait then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  return {want, math.ceil(wait)}
end
return {0, math.ceil(tat + interval - tolerance - now)}
"""


class Gcra:
    """Generic cell rate algorithm (virtual scheduling), with reservation for throttling."""

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, qps: float, burst: int) -> None:
        self.interval = 1.0 / qps
        self.tolerance = max(burst - 1, 0) * self.interval
        self.tat = 0.0

    def reserve(self, now: float, max_wait: float) -> float | None:
        """Seconds to wait before the query may go (0 = now); None = over even after max_wait."""
        tat = self.tat if self.tat > now else now
        wait = tat - self.tolerance - now
        if wait > max_wait:
            return None
        self.tat = tat + self.interval
        return wait if wait > 0 else 0.0


@dataclass
class LeaseResult:
    granted: int
    wait: float  # seconds until a token is free, when granted == 0


class TenantLimiter:
    """Per tenant, per proxy process. ``admit`` is the hot path: no I/O, no allocation."""

    __slots__ = ("batch", "burst", "leasing", "local", "next_free", "qps", "redis_ok", "replicas", "tokens")

    def __init__(self, qps: int, burst: int, replicas: int = 1) -> None:
        self.qps, self.burst = qps, burst
        self.tokens = 0
        self.batch = max(1, min(1000, qps // 20))
        self.replicas = max(1, replicas)
        self.local = Gcra(qps / self.replicas, max(1, burst // self.replicas))
        self.leasing = False
        self.redis_ok = True
        self.next_free = 0.0  # when the shared budget has a token again (from the last refused lease)

    def admit_local(self, now: float, max_wait: float) -> float | None:
        return self.local.reserve(now, max_wait)

    def take(self) -> bool:
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def low(self) -> bool:
        return self.tokens <= self.batch // 2

    def set_replicas(self, replicas: int) -> None:
        replicas = max(1, replicas)
        if replicas != self.replicas:
            self.replicas = replicas
            self.local = Gcra(self.qps / replicas, max(1, self.burst // replicas))


def now() -> float:
    return time.monotonic()
