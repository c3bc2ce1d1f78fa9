"""Queries-per-second limiting: a local GCRA decides in well under a microsecond;
replicas share one budget by leasing batches of tokens from Redis.

Redis keeps a GCRA per tenant (its "theoretical arrival time"); a lease takes up
to ``batch`` tokens at once, so the Redis cost per admitted query is 1/batch.
The batch follows this replica's own admitted rate (about a second of its
traffic), capped at its fair share of the burst, so the tokens all replicas hold
never add up to more than the burst. A leased token is good only while Redis
still counts it as spent: Redis lets go of a lease one interval per token until
the GCRA's arrival time after it, and a replica keeps no more tokens than that
leaves (qps x time left). So unused tokens are never spent on top of what the
refilled bucket grants again, and no second admits more than qps + burst.
When Redis is unreachable each replica enforces qps / replicas locally.
"""

from __future__ import annotations

import math
import time

# KEYS[1] tenant key; ARGV: now_ms, interval_us, tolerance_us, want, max_wait_us.
# Returns {granted, wait_us, spent_us}: `granted` tokens usable after `wait_us` (a
# reservation, so a throttled replica holds its queries instead of asking again and
# again) and counted as spent for `spent_us` from now (the arrival time after this
# lease); or {0, wait_us, 0} when even the first token is further away than max_wait_us.
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
  return {granted, 0, math.floor(tat - now)}
end
local new_tat = tat + want * interval
local wait = new_tat - tolerance - now
if wait <= max_wait then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  return {want, math.ceil(wait), math.floor(new_tat - now)}
end
return {0, math.ceil(tat + interval - tolerance - now), 0}
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


LEASE_HORIZON = 1.0  # a lease asks for about this many seconds of the replica's own traffic


class TenantLimiter:
    """Per tenant, per proxy process. ``take`` is the hot path: no I/O, no allocation."""

    __slots__ = ("batch", "burst", "leasing", "local", "next_free", "older", "older_until", "qps", "rate",
                 "rate_at", "rate_taken", "replicas", "taken", "tokens", "valid_until")

    def __init__(self, qps: int, burst: int, replicas: int = 1) -> None:
        self.qps, self.burst = qps, burst
        self.tokens = 0
        self.valid_until = 0.0  # Redis's arrival time after the last lease, on this clock
        # Of `tokens`, those left from earlier leases: used first, and only while Redis
        # still counts *their* lease (a later lease must not stretch their life).
        self.older = 0
        self.older_until = 0.0
        self.taken = 0  # tokens used so far: the admitted rate comes from it
        self.rate = 0.0  # admitted queries per second on this replica (smoothed)
        self.rate_at = float("-inf")  # no sample yet
        self.rate_taken = 0
        self.replicas = max(1, replicas)
        self.batch = self.min_batch()
        self.local = Gcra(qps / self.replicas, max(1, burst // self.replicas))
        self.leasing = False
        self.next_free = 0.0  # when the shared budget has a token again (from the last refused lease)

    def admit_local(self, now: float, max_wait: float) -> float | None:
        return self.local.reserve(now, max_wait)

    def take(self, now: float) -> bool:
        if self.tokens > 0:
            if self.older:
                self._trim_older(now)
            left = (self.valid_until - now) * self.qps
            if self.tokens - 1 >= left:  # more than the ceil(left) tokens Redis still counts
                self._drop(self.tokens - _whole(left))
            if self.tokens > 0:
                self.tokens -= 1
                if self.older:
                    self.older -= 1
                self.taken += 1
                return True
        return False

    def _trim_older(self, now: float) -> None:
        keep = _whole((self.older_until - now) * self.qps)
        if self.older > keep:
            self.tokens -= self.older - keep
            self.older = keep

    def _drop(self, count: int) -> None:
        """Drop tokens, the oldest first."""
        self.tokens -= count
        self.older = max(0, self.older - count)

    def low(self) -> bool:
        return self.tokens <= self.batch // 2

    def fair_share(self) -> int:
        """The most tokens this replica may hold: all replicas together hold at most the burst."""
        return max(1, self.burst // self.replicas)

    def min_batch(self) -> int:
        return min(self.fair_share(), max(1, self.qps // 20))

    def lease_size(self, now: float) -> int:
        """Tokens to ask for now: about LEASE_HORIZON of this replica's admitted rate, within limits."""
        elapsed = now - self.rate_at  # since the last lease
        wanted = self.rate
        if elapsed > 0:
            sample = (self.taken - self.rate_taken) / elapsed
            # Smoothed over about LEASE_HORIZON: after a longer gap only the gap counts.
            self.rate += min(1.0, elapsed / LEASE_HORIZON) * (sample - self.rate)
            self.rate_at, self.rate_taken = now, self.taken
            # In a surge the smoothed rate lags: follow the latest sample, at most doubling.
            wanted = max(self.rate, min(sample, 2 * self.batch / LEASE_HORIZON))
        self.batch = max(self.min_batch(), min(self.fair_share(), round(wanted * LEASE_HORIZON)))
        return self.batch

    def credit(self, granted: int, valid_until: float, now: float) -> None:
        if self.older:
            self._trim_older(now)
        if self.tokens > self.older:
            # The rest of the last lease becomes `older`; anything older still is dropped
            # (rare: it takes a lease arriving before the one before last is used up).
            self.tokens -= self.older
            self.older, self.older_until = self.tokens, self.valid_until
        self.tokens += granted
        self.valid_until = max(self.valid_until, valid_until)

    def set_replicas(self, replicas: int) -> None:
        replicas = max(1, replicas)
        if replicas != self.replicas:
            self.replicas = replicas
            self.local = Gcra(self.qps / replicas, max(1, self.burst // replicas))
            if self.tokens > self.fair_share():  # more replicas: a smaller share each
                self._drop(self.tokens - self.fair_share())
            self.batch = min(self.batch, self.fair_share())


def _whole(tokens: float) -> int:
    """Tokens Redis still counts, a partly released one included."""
    return math.ceil(tokens) if tokens > 0 else 0


def now() -> float:
    return time.monotonic()
