"""Month-end work of the active headless replica: close the previous month's billing once it has ended.

The hook runs after each pass (only the replica holding the advisory lock passes)
and starts the close in the background, so reconciling never waits on Stripe. The
close is idempotent through its ledger in Postgres: a restart, a second replica
taking over or the CronJob running beside it send nothing twice. A month whose
close left tenants pending (no Stripe customer yet, Stripe refused) is tried again
an hour later; a closed month is remembered and not looked at again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from dynabase.desired.charges import month_bounds, previous_month
from dynabase.spec import TenantDatabase, TierPolicy

log = logging.getLogger(__name__)

# (month, policies, tenants) -> True once the month is closed (every tenant sent or without overage).
CloseMonth = Callable[[str, Mapping[str, TierPolicy], Sequence[TenantDatabase]], Awaitable[bool]]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MonthEndClose:
    def __init__(self, close: CloseMonth, *, settle: dt.timedelta = dt.timedelta(hours=1),
                 retry: dt.timedelta = dt.timedelta(hours=1), clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.close, self.settle, self.retry, self.clock = close, settle, retry, clock
        self.closed_month: str | None = None
        self._next_try: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None

    def after_pass(self, policies: Mapping[str, TierPolicy], tenants: Sequence[TenantDatabase]) -> None:
        """Start the previous month's close when it is due and none is running."""
        now = self.clock()
        month = previous_month(now)
        if month == self.closed_month or now < month_bounds(month)[1] + self.settle:
            return
        if (self._task is not None and not self._task.done()) or (self._next_try and now < self._next_try):
            return
        self._task = asyncio.create_task(self._run(month, dict(policies), list(tenants), now))

    async def _run(self, month: str, policies: Mapping[str, TierPolicy], tenants: Sequence[TenantDatabase],
                   started: dt.datetime) -> None:
        try:
            closed = await self.close(month, policies, tenants)
        except Exception as exc:  # the ledger keeps what was done; the next try sends the rest
            log.warning("billing close failed", extra={"month": month, "error": f"{type(exc).__name__}: {exc}"})
            closed = False
        if closed:
            self.closed_month = month
        else:
            self._next_try = started + self.retry

    async def wait(self) -> None:
        """Until the running close (if any) has finished."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """A close cut short is like a crash: its ledger lets the next run finish it."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
