"""The proxy's lease policy: batch sizing from the admitted rate, the fair-share cap,
token validity, and the cluster-wide bound with the real Lua GCRA in Redis."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import pytest
import redis

from dynabase.proxy.limiter import LEASE_SCRIPT, TenantLimiter

from .conftest import Stack


def test_batch_follows_the_admitted_rate_within_the_fair_share() -> None:
    limiter = TenantLimiter(qps=200, burst=200, replicas=1)
    assert limiter.lease_size(0.0) == 10  # nothing known yet: qps / 20
    limiter.credit(1000, valid_until=10.0, now=0.0)
    for step in range(200):  # 200 admitted in one second
        assert limiter.take(step / 200)
    assert limiter.lease_size(1.0) == 200  # a second of its own traffic, = burst
    limiter.set_replicas(3)
    assert limiter.tokens == 66 and limiter.batch == 66  # a third of the burst each
    for step in range(66):
        assert limiter.take(1.0 + step / 1000)
    assert limiter.lease_size(1.5) == 66


def test_an_idle_replica_asks_for_small_batches_again() -> None:
    limiter = TenantLimiter(qps=1000, burst=1000)
    limiter.lease_size(0.0)
    limiter.credit(1000, valid_until=100.0, now=0.0)
    for step in range(1000):
        assert limiter.take(step / 1000)
    assert limiter.lease_size(1.0) == 1000
    assert not limiter.take(10.0)
    assert limiter.lease_size(10.0) == 50  # nothing admitted for 9.5 s: qps / 20 again


def test_a_surge_doubles_the_batch_per_lease_and_expired_tokens_do_not_count() -> None:
    limiter = TenantLimiter(qps=1000, burst=1000)
    assert limiter.lease_size(0.0) == 50
    limiter.credit(50, valid_until=0.1, now=0.0)
    for _ in range(50):
        assert limiter.take(0.01)
    assert limiter.lease_size(0.01) == 100  # 5000/s for 10 ms: grow, but only twofold
    limiter.credit(100, valid_until=0.15, now=0.01)
    assert limiter.take(0.02)
    assert not limiter.take(0.2)  # the rest expired unused
    assert limiter.lease_size(0.2) == 50  # one query in 0.19 s is no surge


def test_tokens_are_dropped_once_redis_no_longer_counts_them() -> None:
    limiter = TenantLimiter(qps=100, burst=100)
    limiter.credit(5, valid_until=1.0, now=0.0)
    assert limiter.take(0.5)
    assert not limiter.take(1.0)
    assert limiter.tokens == 0
    limiter.credit(50, valid_until=2.0, now=1.0)
    assert limiter.take(1.875)  # Redis still counts 0.125 s x 100/s = 12.5 of them: 13
    assert limiter.tokens == 12


def test_a_new_lease_does_not_stretch_the_life_of_the_last_ones_rest() -> None:
    limiter = TenantLimiter(qps=100, burst=200)
    limiter.credit(10, valid_until=1.0, now=0.0)
    assert limiter.take(0.0)
    limiter.credit(100, valid_until=5.0, now=0.5)
    assert limiter.take(0.9375)  # the 9 left of the first lease, of which Redis still counts 6.25: 7
    assert limiter.tokens == 106
    assert limiter.take(1.0)  # the first lease is gone entirely now
    assert limiter.tokens == 99


def test_more_replicas_shrink_the_share_keeping_the_newest_tokens() -> None:
    limiter = TenantLimiter(qps=100, burst=300)
    limiter.credit(100, valid_until=1.0, now=0.0)
    limiter.credit(100, valid_until=2.0, now=0.1)
    limiter.set_replicas(3)  # a third of the burst: the 100 of the second lease stay
    assert limiter.take(1.5)
    assert limiter.tokens == 49  # and Redis still counts 50 of them at 1.5 s


Lease = Callable[..., list[int]]


def _simulate(lease: Lease, key: str, seed: int, *, qps: int, burst: int, replicas: int,
              seconds: int) -> list[float]:
    """Replicas with on/off traffic of random rates lease from the Redis GCRA (reject mode,
    no round-trip time) on a simulated clock; returns the times of admitted queries."""
    rng = random.Random(seed)
    limiters = [TenantLimiter(qps, burst, replicas) for _ in range(replicas)]
    interval_us, tolerance_us = 1e6 / qps, (burst - 1) * 1e6 / qps
    phase_end, rate, owed, next_free = [0.0] * replicas, [0.0] * replicas, [0.0] * replicas, [0.0] * replicas
    admitted: list[float] = []

    def ask(i: int, now: float) -> None:
        limiter = limiters[i]
        granted, wait_us, spent_us = lease(keys=[key], args=[
            1_000_000_000 + round(now * 1000), interval_us, tolerance_us, limiter.lease_size(now), 0])
        if granted:
            limiter.credit(int(granted), now + int(spent_us) / 1e6, now)
            next_free[i] = 0.0
        else:
            next_free[i] = now + int(wait_us) / 1e6

    for ms in range(seconds * 1000):
        now = ms / 1000
        for i, limiter in enumerate(limiters):
            if now >= phase_end[i]:
                phase_end[i] = now + rng.uniform(0.05, 2.0)
                rate[i] = rng.choice([0, 0, 5, 50, 150, 400, 2000])
            owed[i] += rate[i] / 1000
            while owed[i] >= 1:
                owed[i] -= 1
                ok = limiter.take(now)
                if not ok and now >= next_free[i]:
                    ask(i, now)
                    ok = limiter.take(now)
                if not ok:
                    continue
                admitted.append(now)
                if limiter.low() and now >= next_free[i]:
                    ask(i, now)
    return admitted


def _busiest_second(times: list[float]) -> int:
    first, busiest = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest


CASES = [(200, 200, seed) for seed in range(6)] + [(200, 50, 0), (200, 50, 24)]


@pytest.mark.parametrize(("qps", "burst", "seed"), CASES)
def test_held_tokens_never_lift_a_second_over_qps_plus_burst(stack: Stack, qps: int, burst: int,
                                                             seed: int) -> None:
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"])
    try:
        lease = client.register_script(LEASE_SCRIPT)
        key = f"test:lease:{uuid.uuid4().hex[:8]}"
        admitted = _simulate(lease, key, seed, qps=qps, burst=burst, replicas=3, seconds=20)
        assert len(admitted) > 15 * qps  # the traffic did press on the limit
        assert _busiest_second(admitted) <= qps + burst
        client.delete(key)
    finally:
        client.close()
