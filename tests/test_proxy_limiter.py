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
    limiter.credit(1000, valid_until=10.0)
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
    limiter.credit(1000, valid_until=100.0)
    for step in range(1000):
        assert limiter.take(step / 1000)
    assert limiter.lease_size(1.0) == 1000
    assert not limiter.take(10.0)
    assert limiter.lease_size(10.0) == 50  # nothing admitted for 9.5 s: qps / 20 again


def test_tokens_are_dropped_once_redis_no_longer_counts_them() -> None:
    limiter = TenantLimiter(qps=100, burst=100)
    limiter.credit(5, valid_until=1.0)
    assert limiter.take(0.5)
    assert not limiter.take(1.0)
    assert limiter.tokens == 0


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
            limiter.credit(int(granted), now + int(spent_us) / 1e6)
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


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_held_tokens_never_lift_a_second_over_qps_plus_burst(stack: Stack, seed: int) -> None:
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"])
    try:
        lease = client.register_script(LEASE_SCRIPT)
        key = f"test:lease:{uuid.uuid4().hex[:8]}"
        admitted = _simulate(lease, key, seed, qps=200, burst=200, replicas=3, seconds=20)
        assert len(admitted) > 3000  # the traffic did press on the limit
        assert _busiest_second(admitted) <= 200 + 200
        client.delete(key)
    finally:
        client.close()
