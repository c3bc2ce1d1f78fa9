"""A pass's tenant events, kept: headless mode and the operator append them after each pass.

Each event gets an id derived from its tenant, the pass's time, its place in the
pass and its text, so appending a pass twice (a retry after a failed commit) keeps
one copy and notifies once. The engine's events carry a reason and a message;
``event_data`` adds the figures a webhook receiver acts on, read from the same
pass's status and limits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import asyncpg

from dynabase.backends.events_pg import PostgresEventLog, StoredEvent
from dynabase.backends.notify_pg import OutboxEntry
from dynabase.desired.effective import EffectiveLimits
from dynabase.spec import TenantDatabase, TenantDatabaseStatus

from . import webhook

log = logging.getLogger(__name__)
USAGE_REASONS = ("UsageWarning", "IncludedUsageExceeded", "UsageRestricted", "UsageRestrictionLifted")


class Verdict(Protocol):
    @property
    def ratio(self) -> float | None: ...  # None: the usage could not be read (a carried verdict)


class PassTenant(Protocol):
    """What a pass says of one tenant (the engine's TenantResult)."""

    @property
    def key(self) -> str: ...
    @property
    def tenant(self) -> TenantDatabase: ...
    @property
    def events(self) -> Sequence[tuple[str, str, str]]: ...
    @property
    def status(self) -> TenantDatabaseStatus | None: ...
    @property
    def limits(self) -> EffectiveLimits | None: ...
    @property
    def overage(self) -> Verdict | None: ...


def event_id(tenant: str, at: dt.datetime, index: int, reason: str, message: str) -> str:
    digest = hashlib.sha256("\x1f".join((tenant, at.isoformat(), str(index), reason, message)).encode())
    return "evt_" + digest.hexdigest()[:32]


def event_data(result: PassTenant, reason: str) -> dict[str, Any]:
    """The figures behind an event, for receivers (the message says the same in words)."""
    status, limits = result.status, result.limits
    if status is None or limits is None:
        return {}
    if reason in USAGE_REASONS:
        billing, usage = limits.billing, status.usage
        data: dict[str, Any] = {"includedVcpuHours": billing.included_vcpu_hours,
                                "overagePerVcpuHourUSD": billing.overage_per_vcpu_hour_usd}
        if result.overage is not None and result.overage.ratio is not None:
            data["usedVcpuHours"] = round(result.overage.ratio * billing.included_vcpu_hours, 4)
        if usage is not None:
            data.update(month=usage.month, level=int(usage.level) if usage.level else None)
            if usage.restriction is not None:
                data["restriction"] = usage.restriction
                if usage.restriction == "qps":
                    data["restrictedQps"] = billing.restricted_qps
        return data
    if reason == "TierApplied" and status.history:
        return {"fromTier": status.history[-1].from_tier, "toTier": status.history[-1].to_tier}
    if reason == "DowngradeScheduled":
        return {"fromTier": status.applied_tier, "toTier": status.pending_tier,
                "effectiveAt": status.effective_at.isoformat() if status.effective_at else None}
    lifecycle = limits.lifecycle
    if reason in ("ColdSoon", "TenantCold") and lifecycle.idle_timeout is not None:
        data = {"idleTimeout": str(lifecycle.idle_timeout)}
        cold_at: dt.datetime | None = getattr(result, "cold_at", None)
        if reason == "ColdSoon":
            data["coldWarning"] = str(lifecycle.cold_warning) if lifecycle.cold_warning else None
            data["coldAt"] = cold_at.isoformat() if cold_at else None
        return data
    return {}


def stored_events(results: Iterable[PassTenant], at: dt.datetime) -> tuple[list[StoredEvent], list[OutboxEntry]]:
    """The pass's events as records, and a notification for each notified event of a tenant that
    declares notifications."""
    events: list[StoredEvent] = []
    outbox: list[OutboxEntry] = []
    for result in results:
        tenant = result.tenant
        tier = result.status.applied_tier if result.status is not None else None
        for index, (type_, reason, message) in enumerate(result.events):
            event = StoredEvent(event_id(result.key, at, index, reason, message), result.key, tenant.spec.org_id,
                                tenant.database_name, tier, type_, reason, message, at, event_data(result, reason))
            events.append(event)
            if reason in webhook.NOTIFIED and tenant.spec.notifications is not None:
                outbox.append(OutboxEntry(event.id, event.tenant, reason, webhook.body(event)))
    return events, outbox


class EventRecorder:
    """Appends each pass's events (and their notifications) to the event log in Postgres.

    Events a failed append could not store are kept (up to ``max_unsaved``) and
    appended with the next pass's: their ids make the retry harmless.
    """

    def __init__(self, log_: PostgresEventLog, *, on_notify: Callable[[], None] | None = None,
                 max_unsaved: int = 10_000) -> None:
        self.log = log_
        self.on_notify = on_notify  # wakes the delivery loop when a pass queued notifications
        self.max_unsaved = max_unsaved
        self._unsaved: tuple[list[StoredEvent], list[OutboxEntry]] = ([], [])

    async def record(self, results: Iterable[PassTenant], at: dt.datetime) -> int:
        events, outbox = stored_events(results, at)
        events, outbox = self._unsaved[0] + events, self._unsaved[1] + outbox
        try:
            added = await self.log.append(events, outbox)
        except BaseException:
            kept = events[max(0, len(events) - self.max_unsaved):]
            ids = {e.id for e in kept}
            self._unsaved = (kept, [o for o in outbox if o.event_id in ids])
            raise
        self._unsaved = ([], [])
        if outbox and added and self.on_notify is not None:
            self.on_notify()
        return added

    async def record_quietly(self, results: Iterable[PassTenant], at: dt.datetime) -> None:
        """A failed append is logged and retried with the next pass; it never fails the pass."""
        try:
            await self.record(results, at)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("tenant events not recorded yet", extra={
                "error": f"{type(exc).__name__}: {exc}", "unsaved": len(self._unsaved[0])})


def recorder_of(pool: asyncpg.Pool, *, keep: int | None = None) -> EventRecorder:
    return EventRecorder(PostgresEventLog(pool) if keep is None else PostgresEventLog(pool, keep=keep))
