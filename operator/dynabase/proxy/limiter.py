"""Queries-per-second limiting: a local GCRA decides in well under a microsecond;
replicas share one budget by reserving batches of slots from Redis.

Redis keeps each tenant's schedule as ``lanes`` interleaved GCRAs: lane j owns
every lanes-th slot of the tenant's qps, so a lane runs at qps / lanes. A lease
reserves consecutive slots of the lanes whose schedule is earliest, possibly a
few seconds ahead, and the replica paces them itself: a slot may be used no
earlier than the lane's burst tolerance before it, and a slot that passes unused
is lost, as in one shared GCRA. So every admitted query, on any replica, owns a
distinct slot within [admitted at, admitted at + tolerance]; the lanes' tolerance
is the burst less one slot per extra lane, so no second anywhere admits more than
qps + burst, however large the leases are.

Why lanes: a replica uses its slots at its own pace. Consecutive slots of one
schedule pass at the tenant's full qps, so a replica serving a third of the
traffic would see most of a large batch pass before it got to it. Lanes let it
reserve slots spaced at about its own pace (as many lanes as its rate needs),
which is what makes large leases, and so few Redis calls, possible without
wasting the budget: the Redis cost per admitted query is about
1 / (LEASE_HORIZON x its rate). An idle lane restarts one interval after the one
before it, so the lanes interleave like one schedule instead of falling due at
once. When Redis is unreachable each replica enforces qps / replicas locally.
"""

from __future__ import annotations

import math

# KEYS[1]: hash of lane -> TAT. ARGV: now_us, interval_us, tolerance_us, lanes, want, use, ahead_us.
# Takes up to `want` slots from the `use` lanes with the earliest schedule, booking at most
# ahead_us past what the burst allows now. Returns, per lane used, {lane, granted, first
# slot (us after now)}; or {0, wait_us} when every lane is booked that far, wait_us being
# when one has room again. `now` is the caller's clock when it sent the call.
LEASE_SCRIPT = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local lanes = tonumber(ARGV[4])
local tolerance = tonumber(ARGV[3]) - (lanes - 1) * interval
local want = tonumber(ARGV[5])
local use = tonumber(ARGV[6])
local ahead = tonumber(ARGV[7])
local step = interval * lanes
local names = {}
for j = 1, lanes do names[j] = tostring(j) end
local stored = redis.call('HMGET', KEYS[1], unpack(names))
local order = {}
for j = 1, lanes do
  -- An idle lane starts one interval after the one before it, so the lanes' slots
  -- interleave evenly, as one schedule's would, instead of falling due all at once.
  local tat = tonumber(stored[j] or '0')
  local floor = now + (j - 1) * interval
  if tat < floor then tat = floor end
  order[j] = {j, tat}
end
table.sort(order, function(a, b) return a[2] < b[2] end)
local out = {}
local left = want
for k = 1, use do
  local lane, tat = order[k][1], order[k][2]
  local room = math.floor((now + tolerance + ahead - tat) / step) + 1
  local n = math.min(math.ceil(left / (use - k + 1)), room)
  if n > 0 then
    order[k][2] = tat + n * step
    redis.call('HSET', KEYS[1], lane, string.format('%.0f', order[k][2]))
    out[#out + 1] = lane
    out[#out + 1] = n
    out[#out + 1] = math.floor(tat - now)
    left = left - n
  end
end
if #out == 0 then
  return {0, math.ceil(order[1][2] - tolerance - ahead - now)}
end
-- Kept until the last booking on any lane has passed (not only those booked now).
local latest = now
for j = 1, lanes do
  if order[j][2] > latest then latest = order[j][2] end
end
redis.call('PEXPIRE', KEYS[1], math.ceil((latest - now) / 1000) + 1000)
return out
"""

MAX_LANES = 8
LEASE_HORIZON = 3.0  # a lease asks for about this many seconds of the replica's own traffic
# How far past the burst a lease may book. Throttled queries wait for their slots, so up to
# their queue timeout (at most LEASE_AHEAD: room for every replica's lease and the next);
# rejected ones cannot, so only a little, since slots booked ahead are lost if the traffic
# moves to another replica before they fall due.
LEASE_AHEAD = 2 * LEASE_HORIZON
REJECT_AHEAD = 0.5
GROW = 4  # under pressure a lease is up to this many times the last


def lease_ahead(queue_budget: float) -> float:
    """How far past the burst a lease books, for queries that may wait ``queue_budget`` seconds."""
    return max(REJECT_AHEAD, min(queue_budget, LEASE_AHEAD))


def lanes_for(qps: int, burst: int) -> int:
    """Lanes of a tenant's schedule. Each costs the burst a slot or so (its tolerance, and the
    offset an idle lane starts at), so a small burst gets few lanes, and at most one per 16."""
    return max(1, min(MAX_LANES, burst // 16, qps))


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


class TenantLimiter:
    """Per tenant, per proxy process: the leased slots and the local share, in arithmetic only
    (the leases themselves: admission.SharedLimiter). ``take`` is the hot path: no I/O, and an
    allocation only when a lane's lease is used up."""

    __slots__ = ("batch", "burst", "interval", "lanes", "local", "pressed", "qps", "rate",
                 "rate_at", "rate_taken", "replicas", "slack", "slots", "step", "taken", "tolerance", "use")

    def __init__(self, qps: int, burst: int, replicas: int = 1) -> None:
        self.qps, self.burst = qps, burst
        self.interval = 1.0 / qps
        self.lanes = lanes_for(qps, burst)
        self.step = self.interval * self.lanes  # one lane's interval
        self.tolerance = max(burst - self.lanes, 0) * self.interval  # one lane's tolerance
        self.slack = self.step / 2  # float error in slot arithmetic, far below one slot
        # Leased slots, one entry per lane: [next slot, end, lane] on the monotonic clock.
        self.slots: list[list[float]] = []
        self.taken = 0  # slots used so far: the admitted rate comes from it
        self.pressed = False  # since the last lease a query found no slot due (demand beyond the slots)
        self.rate = 0.0  # admitted queries per second on this replica (smoothed)
        self.rate_at = float("-inf")  # no sample yet
        self.rate_taken = 0
        self.replicas = max(1, replicas)
        self.batch = self.min_batch()
        self.use = 1  # lanes the next lease draws on
        self.local = Gcra(qps / self.replicas, max(1, burst // self.replicas))

    def take(self, now: float, max_wait: float) -> float | None:
        """Use the earliest leased slot: seconds until the query may go (0.0 = now), or None
        when no held slot falls due within max_wait (``holds`` says whether any is held)."""
        best: list[float] | None = None
        best_tat = math.inf
        spent = False
        for entry in self.slots:
            tat = entry[0] if entry[0] > now else now  # a slot that passed unused is lost
            if tat + self.step > entry[1] + self.slack:
                spent = True
            elif tat < best_tat:
                best, best_tat = entry, tat
        if spent:
            self.slots = [e for e in self.slots if max(e[0], now) + self.step <= e[1] + self.slack]
        if best is None:
            if self.taken != self.rate_taken:  # ran out, having used slots since the last lease
                self.pressed = True
            return None
        wait = best_tat - self.tolerance - now
        if wait > 0.0:
            self.pressed = True
            if wait > max_wait:
                return None
        best[0] = best_tat + self.step
        self.taken += 1
        return wait if wait > 0.0 else 0.0

    def remaining(self, now: float) -> int:
        """Leased slots not yet used or lost."""
        left = 0
        for tat, end, _ in self.slots:
            left += max(0, math.floor((end + self.slack - (tat if tat > now else now)) / self.step))
        return left

    def holds(self, now: float) -> bool:
        return self.remaining(now) > 0

    def low(self, now: float) -> bool:
        """Time to lease the next batch: half of this one is used or lost."""
        return self.remaining(now) <= self.batch // 2

    def share(self) -> int:
        """The most slots one lease takes: this replica's share of LEASE_HORIZON at the full qps."""
        return max(1, round(self.qps * LEASE_HORIZON / self.replicas))

    def min_batch(self) -> int:
        return min(self.share(), max(1, self.qps // 20))

    def lease_size(self, now: float) -> int:
        """Slots to ask for now, about LEASE_HORIZON of this replica's admitted rate, and (in
        ``use``) how many lanes to draw them from: enough that they come at least as fast."""
        elapsed = now - self.rate_at  # since the last lease
        wanted = self.rate
        if elapsed > 0:
            sample = (self.taken - self.rate_taken) / elapsed
            # Smoothed over about LEASE_HORIZON: after a longer gap only the gap counts.
            self.rate += min(1.0, elapsed / LEASE_HORIZON) * (sample - self.rate)
            self.rate_at, self.rate_taken = now, self.taken
            # In a surge the smoothed rate lags: follow the latest sample, growing at most GROW-fold.
            wanted = max(self.rate, min(sample, GROW * self.batch / LEASE_HORIZON))
        self.use = max(1, min(self.lanes, math.ceil(wanted * self.lanes / self.qps)))
        size = wanted * LEASE_HORIZON
        if self.pressed:
            # Slots ran short: it takes each as it falls due, so none is wasted. One more
            # lane, and a batch growing fast while the pressure lasts.
            self.use = min(self.lanes, self.use + 1)
            size = max(size, GROW * self.batch)
        else:
            pace = self.use * self.qps / self.lanes  # slots per second from the lanes used
            if 0 < wanted < pace:
                # Each slot is good from the tolerance before it until it passes; a replica that
                # keeps up with its traffic uses them at its own pace, so ask only for as many as
                # that pace reaches before they pass.
                size = min(size, 0.9 * self.tolerance / (1 / wanted - 1 / pace))
        self.pressed = False
        self.batch = max(self.min_batch(), min(self.share(), round(size)))
        return self.batch

    def credit(self, grants: list[tuple[int, int, float]]) -> None:
        """Add a lease: per lane, `count` slots from `start` on this clock, one step apart."""
        for lane, count, start in grants:
            if count <= 0:
                continue
            end = start + count * self.step
            for entry in self.slots:
                if entry[2] == lane and abs(entry[1] - start) < self.slack:  # straight after the last
                    entry[1] = end
                    break
            else:
                self.slots.append([start, end, float(lane)])

    def settle(self, grants: list[tuple[int, int, float]], wait: float, want: int, now: float,
               ahead: float) -> float:
        """Take a lease's answer: its slots; returns when to ask again (0.0: at once). A short
        answer means the schedule is booked as far ahead as allowed: ask again once the missing
        slots can have come free, or after half the booking window (a slot can be booked from
        tolerance + `ahead` before it falls due, so none is lost waiting that long), rather than
        straight away, lest a starved replica go to Redis for nearly every query."""
        self.credit(grants)
        got = sum(count for _, count, _ in grants)
        if got >= want // 2:
            return 0.0
        window = self.tolerance + ahead
        return now + max(wait, min(window / 2, (want - got) * self.interval))

    def lease_args(self, now_us: int, want: int, ahead: float) -> list[float]:
        """The lease script's ARGV for `want` slots booked at most `ahead` seconds past what the
        burst allows now; `now_us` is the wall clock in microseconds."""
        interval_us = 1_000_000 / self.qps
        return [now_us, interval_us, max(self.burst - 1, 0) * interval_us, self.lanes, want, self.use,
                int(ahead * 1_000_000)]

    def set_replicas(self, replicas: int) -> None:
        replicas = max(1, replicas)
        if replicas != self.replicas:
            self.replicas = replicas
            self.local = Gcra(self.qps / replicas, max(1, self.burst // replicas))
            self.batch = min(self.batch, self.share())


def lease_reply(reply: list[int], sent: float) -> tuple[list[tuple[int, int, float]], float]:
    """The lease script's answer on this clock (`sent`: when the call went out): the grants
    per lane as (lane, count, first slot), or none and how long until a lane has room."""
    if len(reply) < 3:
        return [], max(0, int(reply[1])) / 1_000_000
    return [(int(reply[i]), int(reply[i + 1]), sent + int(reply[i + 2]) / 1_000_000)
            for i in range(0, len(reply) - 2, 3)], 0.0
