"""The protocol every backend pass follows.

A pass is built for one reconcile. At its first step it observes its backend
once for all tenants and plans per tenant (pure); then, unless it is a dry run,
it applies the phase each step names. An observation that fails becomes each
affected tenant's False condition (ObserveFailed) and the pass applies nothing:
what the backend holds stays, and the status keeps the tier it recorded
(engine.status). A failure while applying becomes the tenant's condition too.
Either way the other passes run.
State that outlives one reconcile (caches, locks) is handed in by the engine.
A pass reads what earlier passes settle (passwords) at its first step, not when
it is built.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from dynabase.spec import TierPolicy

from ..failures import OBSERVE_FAILED, record_failure
from ..results import TenantResult


class Phase(enum.Enum):
    OBSERVE = "observe"  # observe and plan only
    FALLING = "falling"  # limits that fall
    RISING = "rising"  # limits that rise, and every other change that lowers nothing
    ALL = "all"  # a backend applied in one go


@dataclass
class PassRun:
    """What every pass of one reconcile sees."""

    results: list[TenantResult]  # the declared tenants; decision is None when their tier cannot be resolved
    deleted: list[TenantResult]
    policies: dict[str, TierPolicy]
    dry_run: bool
    complete: bool  # results are all tenants: shared state is rebuilt, not patched
    concurrency: int

    @property
    def resolved(self) -> list[TenantResult]:
        return [r for r in self.results if r.decision is not None]

    @property
    def everyone(self) -> list[TenantResult]:
        return [*self.results, *self.deleted]

    def with_password(self) -> list[TenantResult]:
        """Resolved tenants with a password: the Postgres pass settles them, and a dry run
        generates none, so passes after it ask at their first step."""
        return [r for r in self.resolved if r.password is not None]


class BackendPass(ABC):
    backend: ClassVar[str]  # its name in ``order.ORDER`` and in plans
    condition: ClassVar[str]  # the condition its outcomes set, e.g. "PostgresReady"

    def __init__(self, run: PassRun) -> None:
        self.run = run
        self._planned: bool | None = None  # None: not observed yet; False: the observation failed

    def affected(self) -> Sequence[TenantResult]:
        """Who carries this backend's condition when the backend cannot be observed."""
        return self.run.resolved

    @abstractmethod
    async def observe(self) -> None:
        """Read the backend once for all tenants; raise if it cannot be read."""

    @abstractmethod
    def plan(self) -> None:
        """Decide per tenant from the observation (pure) and fill ``TenantResult.plans``."""

    @abstractmethod
    async def apply(self, phase: Phase) -> None:
        """Write what the plan changes in ``phase``; failures go through ``fail``."""

    def fail(self, results: Iterable[TenantResult], reason: str, exc: BaseException,
             *, event: str | None = None) -> None:
        record_failure(results, self.condition, reason, exc, event=event)

    async def step(self, phase: Phase) -> None:
        if self._planned is None:
            self._planned = await self._observe_and_plan()
        if self._planned and phase is not Phase.OBSERVE and not self.run.dry_run:
            await self.apply(phase)

    async def _observe_and_plan(self) -> bool:
        try:
            await self.observe()
        except Exception as exc:  # this backend's condition; the other passes go on
            # No Event: nothing changed that a reader could know of. Nothing is applied either,
            # so what the backend holds (a restriction, a quota's read-only user) stays as it is.
            self.fail(self.affected(), OBSERVE_FAILED, exc)
            return False
        self.plan()
        return True
