"""The proxy's lease policy: batch sizing from the admitted rate, the fair-share cap,
token validity, and the cluster-wide bound with the real Lua GCRA in Redis."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from dynabase.proxy.limiter import LEASE_SCRIPT, Gcra, TenantLimiter, lanes_for, lease_ahead, lease_reply

from .conftest import Stack


def test_batch_follows_the_admitted_rate_within_its_share() -> None:
    limiter = TenantLimiter(qps=200, burst=200, replicas=1)
    assert limiter.lanes == 8
    assert limiter.lease_size(0.0) == 10  # nothing known yet: qps / 20
    limiter.credit([(lane, 125, lane * 0.005) for lane in range(8)])  # 1000 slots over 5 s
    for step in range(400):  # 200 admitted per second for two seconds
        assert limiter.take(step / 200, 0.0) == 0.0
        if step == 199:
            assert limiter.lease_size(1.0) == 200  # smoothed over three seconds: 67/s, for three seconds
    assert limiter.lease_size(2.0) == 600  # the surge followed: three seconds of its own traffic
    assert limiter.use == 8  # from every lane: it runs at the full qps
    limiter.set_replicas(3)
    assert limiter.batch == 200  # a third of three seconds at the full qps each
    assert limiter.lease_size(2.5) == 200


def test_an_idle_replica_asks_for_small_batches_on_few_lanes_again() -> None:
    limiter = TenantLimiter(qps=1000, burst=1000)
    limiter.lease_size(0.0)
    limiter.credit([(lane, 375, lane * 0.001) for lane in range(8)])  # 3000 slots over 3 s
    for step in range(1000):
        assert limiter.take(step / 1000, 0.0) == 0.0
    assert limiter.lease_size(1.0) == 1000  # smoothed to 333/s: three seconds of that
    assert limiter.use == 3  # a third of the qps: three lanes of eight
    assert limiter.take(10.0, 0.0) is None
    assert limiter.lease_size(10.0) == 50 and limiter.use == 1  # nothing for 9 s: qps / 20 on one lane


def test_a_pressed_replica_grows_its_batch_fast() -> None:
    limiter = TenantLimiter(qps=1000, burst=1000)
    assert limiter.lease_size(0.0) == 50
    limiter.credit([(1, 50, 0.0)])
    for _ in range(50):
        assert limiter.take(0.0, 0.0) == 0.0
    assert limiter.take(0.0, 0.0) is None  # out of slots, having used them: pressed
    assert limiter.lease_size(0.01) >= 2 * 50
    assert limiter.lease_size(0.2) == 50  # nothing more in 0.19 s: back to the minimum


def test_slots_are_paced_by_the_burst_tolerance_and_lost_when_they_pass() -> None:
    assert (lanes_for(10, 3), lanes_for(200, 50), lanes_for(200, 200), lanes_for(5000, 5000)) == (1, 3, 8, 8)
    # One lane of 8 q/s with two slots of tolerance (in binary fractions, so the sums are exact).
    limiter = TenantLimiter(qps=8, burst=3)
    assert limiter.lanes == 1
    limiter.credit([(1, 8, 1.0)])  # slots 1.0 ... 1.875
    assert limiter.take(0.5, 0.0) is None  # the first slot (1.0) is due at 0.75
    assert limiter.holds(0.5)
    assert limiter.take(0.75, 0.0) == 0.0
    assert limiter.take(0.75, 0.0) is None  # the next (1.125) at 0.875
    assert limiter.take(0.75, 0.5) == 0.125  # throttled: it waits for it
    assert limiter.take(1.0, 0.0) == 0.0  # slot 1.25, due at 1.0
    assert limiter.remaining(1.0) == 5
    assert limiter.take(1.5, 0.0) == 0.0  # slots 1.375 passed unused: lost; this one is 1.5
    assert limiter.remaining(1.5) == 3  # 1.625, 1.75, 1.875
    assert limiter.take(2.0, 1.0) is None and not limiter.holds(2.0)


def test_the_earliest_slot_of_any_lane_goes_first_and_a_lane_continued_is_one_entry() -> None:
    # Two lanes of 64 q/s (slots 1/64 s apart on each) with a tolerance of 32 slots, 0.25 s:
    # a slot is due 0.25 s before its time. Binary fractions, so the sums are exact.
    limiter = TenantLimiter(qps=128, burst=34)
    assert limiter.lanes == 2
    tick = 1 / 128
    limiter.credit([(1, 2, 1.0), (2, 2, 1.0 + tick)])  # lane 1: 1, 1 + 2 ticks; lane 2: 1 + 1 tick, 1 + 3 ticks
    limiter.credit([(1, 2, 1.0 + 4 * tick)])  # straight after lane 1's: continues it
    assert len(limiter.slots) == 2
    # Each is taken the moment it is due: only the earliest slot of either lane is.
    assert [limiter.take(1.0 + k * tick - 0.25, 0.0) for k in range(5)] == [0.0] * 5
    now = 1.0 + 4 * tick - 0.25
    assert limiter.remaining(now) == 1  # lane 1 at 1 + 6 ticks
    assert limiter.take(now, 0.0) is None
    assert limiter.take(now, 0.05) == 2 * tick
    assert not limiter.holds(now)


def test_lease_replies_are_placed_on_the_local_clock() -> None:
    assert lease_reply([3, 10, 0, 5, 12, 2500], 100.0) == ([(3, 10, 100.0), (5, 12, 100.0025)], 0.0)
    assert lease_reply([0, 400_000], 100.0) == ([], 0.4)
    limiter = TenantLimiter(qps=100, burst=20)  # one lane, tolerance 0.19 s
    # far short: the schedule is full; ask again after half the booking window (47 missing slots: 0.47 s)
    assert limiter.settle([(1, 3, 0.0)], 0.0, want=50, now=0.0, ahead=0.5) == pytest.approx(0.345)
    # the 7 missing slots come free within 0.07 s
    assert limiter.settle([(1, 3, 0.0)], 0.0, want=10, now=0.0, ahead=0.5) == pytest.approx(0.07)
    assert limiter.settle([], 0.4, want=50, now=1.0, ahead=0.5) == 1.4  # refused: when a lane has room
    assert limiter.settle([(2, 40, 1.0)], 0.0, want=50, now=1.0, ahead=0.5) == 0.0


Lease = Callable[..., list[int]]


def _simulate(lease: Lease, key: str, seed: int | None, *, qps: int, burst: int, replicas: int, seconds: int,
              ahead: float) -> tuple[list[float], int, int]:
    """Replicas lease from the Redis lanes (no round-trip time) on a simulated clock, each
    offering on/off traffic of random rates (or, with no seed, 10x the limit all the time);
    a query with no slot due is refused. Returns the times of admitted queries, the number
    of leases, and how many queries one shared GCRA would have admitted."""
    rng = random.Random(seed)
    limiters = [TenantLimiter(qps, burst, replicas) for _ in range(replicas)]
    next_free = [0.0] * replicas  # per replica: when to lease again after a short answer
    ideal, ideal_admitted = Gcra(qps, burst), 0
    phase_end, rate, owed = [0.0] * replicas, [0.0] * replicas, [0.0] * replicas
    admitted: list[float] = []
    leases = 0

    def ask(i: int, now: float) -> None:
        nonlocal leases
        limiter = limiters[i]
        want = limiter.lease_size(now)
        reply = lease(keys=[key], args=limiter.lease_args(1_000_000_000_000 + round(now * 1_000_000), want, ahead))
        leases += 1
        next_free[i] = limiter.settle(*lease_reply(reply, now), want, now, ahead)

    for ms in range(seconds * 1000):
        now = ms / 1000
        for i, limiter in enumerate(limiters):
            if seed is None:
                rate[i] = 10 * qps / replicas
            elif now >= phase_end[i]:
                phase_end[i] = now + rng.uniform(0.05, 2.0)
                rate[i] = rng.choice([0, 0, 5, 50, 150, 400, 2000])
            owed[i] += rate[i] / 1000
            while owed[i] >= 1:
                owed[i] -= 1
                ideal_admitted += ideal.reserve(now, 0.0) is not None
                ok = limiter.take(now, 0.0) is not None
                if not ok and not limiter.holds(now) and now >= next_free[i]:
                    ask(i, now)
                    ok = limiter.take(now, 0.0) is not None
                if not ok:
                    continue
                admitted.append(now)
                if limiter.low(now) and now >= next_free[i]:
                    ask(i, now)
    return admitted, leases, ideal_admitted


def _busiest_second(times: list[float]) -> int:
    first, busiest = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest


@pytest.fixture
def lease(stack: Stack) -> Iterator[tuple[Lease, str]]:
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"])
    key = f"test:lease:{uuid.uuid4().hex[:8]}"
    try:
        yield client.register_script(LEASE_SCRIPT), key
        client.delete(key)
    finally:
        client.close()


REJECT, THROTTLE = lease_ahead(0.0), lease_ahead(30.0)  # queue budgets: refused at once, throttled 30 s
CASES = [(200, 200, seed) for seed in range(6)] + [(200, 50, 0), (200, 50, 24), (50, 5, 3)]


@pytest.mark.parametrize("ahead", [REJECT, THROTTLE], ids=["reject", "throttle"])
@pytest.mark.parametrize(("qps", "burst", "seed"), CASES)
def test_no_second_anywhere_admits_more_than_qps_plus_burst(lease: tuple[Lease, str], qps: int, burst: int,
                                                            seed: int, ahead: float) -> None:
    admitted, leases, ideal = _simulate(*lease, seed, qps=qps, burst=burst, replicas=3, seconds=20, ahead=ahead)
    assert ideal > 15 * qps  # the traffic did press on the limit
    assert _busiest_second(admitted) <= qps + burst
    if ahead == REJECT:
        assert len(admitted) >= 0.75 * ideal  # few slots booked ahead, and lost as traffic moves
        assert leases <= 0.2 * len(admitted)  # a starved replica does not ask for every query


def test_the_schedule_is_kept_until_its_last_booking_passes(lease: tuple[Lease, str], stack: Stack) -> None:
    script, key = lease
    far, near = TenantLimiter(qps=200, burst=200), TenantLimiter(qps=200, burst=200)
    now_us = 1_000_000_000_000
    far.lease_size(0.0)  # a first lease: from one lane
    reply = script(keys=[key], args=far.lease_args(now_us, 400, ahead=6.0))  # one lane, booked 7 s ahead
    grants, _ = lease_reply(reply, 0.0)
    assert grants == [(1, 175, 0.0)]  # 40 ms apart, up to the tolerance (0.96 s) + 6 s
    near.lease_size(0.0)
    reply = script(keys=[key], args=near.lease_args(now_us, 1, ahead=6.0))  # another lane, one slot
    grants, _ = lease_reply(reply, 0.0)
    assert len(grants) == 1 and grants[0][0] != 1
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"])
    try:
        assert client.pttl(key) > 6_500  # not cut to the short booking's life (about 1 s)
    finally:
        client.close()


@pytest.mark.parametrize("replicas", [1, 3])
@pytest.mark.parametrize(("ahead", "most_leases"), [(REJECT, 0.05), (THROTTLE, 0.01)], ids=["reject", "throttle"])
def test_a_tenant_pressing_10x_on_its_limit_is_held_to_it_with_few_leases(lease: tuple[Lease, str], replicas: int,
                                                                          ahead: float, most_leases: float) -> None:
    admitted, leases, _ = _simulate(*lease, None, qps=200, burst=200, replicas=replicas, seconds=20, ahead=ahead)
    assert abs(len(admitted) / (200 * 20 + 200) - 1) <= 0.05
    assert leases / len(admitted) <= most_leases
