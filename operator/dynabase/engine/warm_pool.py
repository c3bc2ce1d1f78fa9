"""Keeps each TierPolicy's warm pool at its size, in the background.

Passes only claim (``desired.postgres``); this task makes what they claim
again. It runs beside the passes on its own connections, never inside one, and
wakes when a pass saw the policies (so after claims) or every ``recheck``
seconds (another engine may have claimed). ``concurrency`` bounds the CREATE
DATABASEs in flight: each copies template1 and competes with the tenants'
queries for disk and CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping

from prometheus_client import Counter, Gauge

from dynabase.backends.warm_pool import WarmPoolStore, drop_unclaimed, pool_databases
from dynabase.desired.warm_pool import fill_plan, pool_database_name, pool_prefix

from .failures import describe_error

log = logging.getLogger(__name__)

POOL_DATABASES = Gauge("dynabase_warm_pool_databases", "Unclaimed warm pool databases, by TierPolicy.", ["policy"])
POOL_CREATED = Counter("dynabase_warm_pool_created_total", "Warm pool databases created.")
CLAIMS = Counter("dynabase_warm_pool_claims_total",
                 "New tenant databases: claimed from the warm pool, or created because it was empty.", ["outcome"])
for _outcome in ("claimed", "pool_empty"):  # at 0 from the start, so increase() sees the first one
    CLAIMS.labels(_outcome)


class WarmPoolFiller:
    def __init__(self, store: WarmPoolStore, *, concurrency: int = 1, recheck: float = 30.0) -> None:
        self.store = store
        # One CREATE DATABASE at a time: bench.signup (50 sign-ups while the pool refills, 2 vCPUs)
        # gave apply -> first query p99 164-240 ms with 1, 206-415 ms with 2; the refill rate halves.
        self.concurrency = concurrency
        self.recheck = recheck
        self.sizes: dict[str, int] = {}
        self.refill = True  # False: passes still claim, nothing is made again (one-off commands, tests)
        self.created = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.filled = asyncio.Event()  # set after a round that left every pool at its size

    def want(self, sizes: Mapping[str, int]) -> None:
        """The sizes the policies declare now; starts the task the first time any is above 0."""
        self.sizes = dict(sizes)
        if not self.refill or (self._task is None and not any(sizes.values())):
            return  # off, or never had a pool: nothing to start (and nothing to shrink)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="warm pool filler")

    async def until_full(self) -> None:
        """Returns after a fill round that found every pool at its size (benches and tests wait on it)."""
        self.filled.clear()
        self._wake.set()
        await self.filled.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.recheck if not failures else min(60, 2 ** failures))
            self._wake.clear()
            try:
                while await self.fill_once():  # claims may have happened while it created: go again
                    pass
                failures = 0
            except Exception as exc:  # the next wake-up tries again; passes still create databases
                failures += 1
                log.warning("warm pool fill failed", extra={"error": describe_error(exc)})

    async def fill_once(self) -> int:
        """One round: create and drop what brings the pools to their sizes. Returns databases created."""
        async with self.store.fill_lock() as conn:
            if conn is None:
                return 0  # another engine fills now; the recheck looks again
            existing = await pool_databases(conn)
            plan = fill_plan(self.sizes, (name for _oid, name in existing))
            by_name = {name: oid for oid, name in existing}
            for name in plan.drop:
                await drop_unclaimed(conn, by_name[name], name)
            names = [pool_database_name(policy, secrets.token_hex(6))
                     for policy, count in plan.create.items() for _ in range(count)]
            created = await self._create(names)
            self._publish(await pool_databases(conn))
        if not names:
            self.filled.set()
        return created

    async def _create(self, names: list[str]) -> int:
        if not names:
            return 0
        queue: asyncio.Queue[str] = asyncio.Queue()
        for name in names:
            queue.put_nowait(name)
        done = 0

        async def worker() -> None:
            nonlocal done
            async with self.store.connection() as conn:
                while not queue.empty():
                    await self.store.create(conn, queue.get_nowait())
                    done += 1
                    self.created += 1
                    POOL_CREATED.inc()

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(names)))))
        return done

    def _publish(self, existing: list[tuple[int, str]]) -> None:
        for policy in self.sizes:
            prefix = pool_prefix(policy)
            POOL_DATABASES.labels(policy).set(sum(name.startswith(prefix) for _oid, name in existing))
