"""Headless mode: reconcile the manifests of a folder or git repository every interval.

- An invalid file is reported (file:line) and skipped; every other tenant is still
  reconciled, and the last good declaration of an invalid tenant is kept — a typo
  never deletes a database.
- A tenant that disappears from the source is handled per its deletionPolicy only
  after it has been absent for the confirmation window.
- Several replicas are safe: a Postgres advisory lock makes one of them active.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from dynabase.desired.declared_status import describe, policy_statuses, spec_problems
from dynabase.engine.reconciler import Engine, PassResult, utcnow
from dynabase.events.delivery import Deliverer
from dynabase.events.record import EventRecorder
from dynabase.spec import TenantDatabase, TierPolicy, TierPolicyStatus
from dynabase.spec.documents import ManifestError, load_paths

from .month_end import MonthEndClose

log = logging.getLogger(__name__)
LOCK_KEY = 0x64796E61  # "dyna": the advisory lock that elects the active replica


class Source(Protocol):
    def checkout(self) -> Any: ...

    def describe(self) -> str: ...


@dataclass
class HeadlessState:
    policies: dict[str, TierPolicy] = field(default_factory=dict)
    tenants: dict[str, TenantDatabase] = field(default_factory=dict)  # last good, by namespace/name
    absent_since: dict[str, dt.datetime] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    policy_status: dict[str, TierPolicyStatus] = field(default_factory=dict)
    unusable_policies: dict[str, str] = field(default_factory=dict)  # declared, no valid version: why
    last_pass: PassResult | None = None
    last_pass_at: dt.datetime | None = None
    passes: int = 0
    active: bool = False
    source: str = ""


class HeadlessReconciler:
    def __init__(self, engine: Engine, source: Source, *, interval: float = 30.0,
                 confirm_deletion: dt.timedelta = dt.timedelta(minutes=10), lock_dsn: str | None = None,
                 clock: Any = utcnow, month_end: MonthEndClose | None = None,
                 events: EventRecorder | None = None, notifier: Deliverer | None = None) -> None:
        self.engine = engine
        self.source = source
        self.interval = interval
        self.confirm_deletion = confirm_deletion
        self.lock_dsn = lock_dsn
        self.clock = clock
        self.month_end = month_end  # billing close of the previous month, on the active replica
        self.events = events  # each pass's tenant events, kept in Postgres
        self.notifier = notifier  # sends the notifications those events queue
        self.state = HeadlessState()
        self._lock_conn: asyncpg.Connection | None = None

    async def acquire(self) -> bool:
        """True while this replica holds the advisory lock (the lock lives as long as its session)."""
        if self.lock_dsn is None:
            self.state.active = True
            return True
        try:
            if self._lock_conn is None or self._lock_conn.is_closed():
                self._lock_conn = await asyncpg.connect(self.lock_dsn)
                self.state.active = False
            if not self.state.active:
                self.state.active = bool(await self._lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY))
        except (OSError, asyncpg.PostgresError):
            self.state.active = False
            self._lock_conn = None
        return self.state.active

    async def release(self) -> None:
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            await self._lock_conn.close()
        self._lock_conn = None
        self.state.active = False

    def load(self) -> tuple[dict[str, TierPolicy], list[TenantDatabase], list[TenantDatabase]]:
        """Declared state from the source, merged with the last good one. Returns policies, tenants, deleted."""
        root = self.source.checkout()
        result = load_paths([root])
        self.state.errors = result.errors
        self.state.source = self.source.describe()
        for error in result.errors:
            log.warning("invalid manifest skipped", extra={"where": f"{error.file}:{error.line}", "error": str(error)})
        now = self.clock()
        policies = {d.resource.name: d.resource for d in result.documents if isinstance(d.resource, TierPolicy)}
        for kind, key in result.invalid_keys:
            if kind == "TierPolicy" and key in self.state.policies:
                policies.setdefault(key, self.state.policies[key])
        tenants = {d.resource.key: d.resource for d in result.documents if isinstance(d.resource, TenantDatabase)}
        invalid = {key for kind, key in result.invalid_keys if kind == "TenantDatabase"}
        present = set(tenants) | invalid  # in the source, valid or not
        for key in invalid:
            if key in self.state.tenants:
                tenants.setdefault(key, self.state.tenants[key])  # keep the last good declaration
        for key in present:
            self.state.absent_since.pop(key, None)
        deleted: list[TenantDatabase] = []
        for key, tenant in self.state.tenants.items():
            if key in present:
                continue
            since = self.state.absent_since.setdefault(key, now)
            if now - since >= self.confirm_deletion:
                deleted.append(tenant)
                self.state.absent_since.pop(key, None)
            else:
                tenants[key] = tenant  # still managed until the absence is confirmed
        self.state.policies = policies
        self.state.tenants = dict(tenants)
        self._judge_policies(result.errors, policies, list(tenants.values()), now)
        return policies, list(tenants.values()), deleted

    def _judge_policies(self, errors: list[ManifestError], policies: dict[str, TierPolicy],
                        tenants: list[TenantDatabase], now: dt.datetime) -> None:
        """Each policy's status (as the operator writes it on the TierPolicy), for /status."""
        invalid: dict[str, list[tuple[str, str]]] = {}
        for error in errors:
            if error.kind == "TierPolicy":
                invalid.setdefault(error.name, []).append((error.field, error.message))
        self.state.policy_status = policy_statuses(policies, invalid, tenants, self.state.policy_status, now)
        self.state.unusable_policies = {name: describe(spec_problems(found)) for name, found in invalid.items()
                                        if name not in policies}

    async def run_once(self) -> PassResult | None:
        if not await self.acquire():
            return None
        policies, tenants, deleted = await asyncio.to_thread(self.load)
        result = await self.engine.reconcile_all(policies, tenants, deleted=deleted, complete=True,
                                                 unusable_policies=self.state.unusable_policies)
        self.state.last_pass, self.state.last_pass_at = result, self.clock()
        if self.events is not None:
            await self.events.record_quietly(result.tenants, self.state.last_pass_at)
        self.state.passes += 1
        if self.month_end is not None:
            self.month_end.after_pass(policies, tenants)
        ready = sum(t.ready for t in result.tenants)
        log.info("headless pass", extra={"tenants": len(result.tenants), "ready": ready,
                                         "seconds": round(result.seconds, 3), "writes": result.writes,
                                         "invalid": len(self.state.errors), "source": self.state.source})
        return result

    async def run(self, stop: asyncio.Event) -> None:
        # A Cold tenant woken at a proxy is marked awake by an early pass, not an interval later.
        nudge = asyncio.Event()
        watcher = asyncio.create_task(self.engine.watch_wakes(lambda _database: nudge.set(), stop))
        sender = None
        if self.notifier is not None:  # on the active replica: it knows the declared endpoints
            sender = asyncio.create_task(self.notifier.run(stop, when=lambda: self.state.active
                                                           and self.state.passes > 0))
        try:
            while not stop.is_set():
                started = time.monotonic()
                nudge.clear()
                try:
                    await self.run_once()
                except Exception as exc:  # a bad pass must not end the loop; the next one retries
                    log.warning("headless pass failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                delay = max(0.0, self.interval - (time.monotonic() - started))
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(nudge.wait())]
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
        finally:
            for task in (watcher, sender):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.month_end is not None:
                await self.month_end.stop()
            await self.release()

    def tenant(self, key: str) -> TenantDatabase | None:
        """The declaration this replica manages now (its last good one)."""
        return self.state.tenants.get(key)

    def status(self) -> dict[str, Any]:
        last = self.state.last_pass
        return {
            "active": self.state.active,
            "source": self.state.source,
            "passes": self.state.passes,
            "lastPassAt": self.state.last_pass_at.isoformat() if self.state.last_pass_at else None,
            "lastPassSeconds": round(last.seconds, 3) if last else None,
            "invalidManifests": [str(e) for e in self.state.errors],
            "pendingDeletion": {k: v.isoformat() for k, v in self.state.absent_since.items()},
            "policies": {name: status.model_dump(mode="json", by_alias=True, exclude_none=True)
                         for name, status in self.state.policy_status.items()},
            "tenants": {
                t.key: {
                    "tier": t.status.applied_tier if t.status else None,
                    "pendingTier": t.status.pending_tier if t.status else None,
                    "phase": t.status.phase if t.status else None,
                    "ready": t.ready,
                    "conditions": [
                        {"type": o.condition_type, "ok": o.ok, "reason": o.reason, "message": o.message}
                        for o in t.outcomes
                    ],
                    "error": t.error.message if t.error else None,
                }
                for t in (last.tenants if last else [])
            },
        }
