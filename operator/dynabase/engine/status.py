"""A tenant's status after a pass (phase, conditions, tier history, usage) and the Events
that announce what changed; recorded only when it differs from the previous one."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter as Tally
from collections.abc import Mapping

from dynabase.desired.lifecycle import cold_soon_message, idle_message, phase, was_cold
from dynabase.desired.overage import usage_outcome
from dynabase.spec import TenantDatabaseStatus
from dynabase.spec.tenant import TierChange

from . import metrics
from .conditions import Outcome, build_conditions, make_condition
from .failures import unobserved
from .results import TenantResult
from .stores import StatusStore

HISTORY_LIMIT = 20
STATUS_WRITERS = 16  # status writes may be API calls (the operator): a few at a time, not one by one


async def record_all(store: StatusStore, results: list[TenantResult], statuses: Mapping[str, TenantDatabaseStatus],
                     now: dt.datetime, *, idle_tracked: bool) -> None:
    """Build and save each tenant's status; ``idle_tracked``: activity is known (a proxy meters it)."""
    writers = asyncio.Semaphore(STATUS_WRITERS)

    async def record(result: TenantResult) -> None:
        previous = statuses.get(result.key)
        count_drift(result, previous)
        async with writers:
            await record_status(store, result, previous, now, idle_tracked=idle_tracked)

    await asyncio.gather(*(record(r) for r in results))


def count_drift(result: TenantResult, previous: TenantDatabaseStatus | None) -> None:
    """A change with an unchanged declaration that was already Ready means someone drifted it."""
    if previous is None or previous.observed_generation != result.tenant.metadata.generation:
        return
    ready = previous.condition("Ready")
    if ready is None or ready.status != "True" or previous.applied_tier != result.limits_tier:
        return
    if was_cold(previous) != result.cold:
        return  # going Cold or waking changes backends on purpose
    for backend, lines in result.plans.items():
        if lines:
            metrics.DRIFT_CORRECTIONS.labels(backend).inc()


def count_failures(results: list[TenantResult]) -> None:
    for result in results:
        for outcome in result.outcomes:
            # An outcome with a status of its own (DirectAccess) is a finding about the set-up, not a
            # backend's error: counted, it would raise the errors alert on every pass.
            if not outcome.ok and outcome.status is None:
                metrics.BACKEND_ERRORS.labels(metrics.backend_of(outcome.condition_type), outcome.reason).inc()


def update_gauges(results: list[TenantResult]) -> None:
    counts: Tally[tuple[str, str]] = Tally()
    pending = 0
    for result in results:
        status = result.status
        if status is None:
            continue
        counts[(status.applied_tier or "none", status.phase)] += 1
        pending += status.pending_tier is not None
    metrics.set_tenant_gauges(counts, pending)


async def record_status(store: StatusStore, result: TenantResult, previous: TenantDatabaseStatus | None,
                        now: dt.datetime, *, idle_tracked: bool) -> None:
    status = build_status(result, previous, now, idle_tracked=idle_tracked)
    result.status = status
    tenant_gauges(result, status)
    if status != previous:
        result.status_changed = True
        await store.save(result.tenant.key, status)


def tenant_gauges(result: TenantResult, status: TenantDatabaseStatus) -> None:
    """The tenant's tier and since when it is Ready; a tenant in error keeps the tier it had."""
    if result.decision is not None:
        metrics.set_tier(result.key, result.decision.applied_tier, result.decision.limits.rank)
    ready = status.condition("Ready")
    since = ready.last_transition_time if ready is not None and ready.status == "True" else None
    metrics.set_ready_since(result.key, since.timestamp() if since is not None else None)


def build_status(result: TenantResult, previous: TenantDatabaseStatus | None, now: dt.datetime,
                 *, idle_tracked: bool) -> TenantDatabaseStatus:
    tenant = result.tenant
    generation = tenant.metadata.generation
    if result.error is not None:
        return TenantDatabaseStatus(
            observed_generation=generation,
            phase="Degraded",
            applied_tier=previous.applied_tier if previous else None,
            pending_tier=previous.pending_tier if previous else None,
            effective_at=previous.effective_at if previous else None,
            conditions=[make_condition("Ready", False, result.error.reason, result.error.message, previous,
                                       generation, now)],
            history=list(previous.history) if previous else [],
            usage=previous.usage if previous else None,  # the month's verdict and its clock outlive the error
        )
    decision = result.decision
    assert decision is not None
    if idle_tracked:
        awake(result, previous, now)
    woke(result, previous)
    usage(result, previous)
    applied: str | None = decision.applied_tier
    pending, effective_at = decision.pending_tier, decision.effective_at
    if unobserved(result) and previous is not None:
        # A backend that could not be read may not hold the tier: the record stays until a pass sees it.
        applied, pending, effective_at = previous.applied_tier, previous.pending_tier, previous.effective_at
        history = list(previous.history)
    else:
        history = tier_history(result, previous, now)
    return TenantDatabaseStatus(
        observed_generation=generation,
        phase=phase(suspended=tenant.spec.suspended, ready=result.ready, cold=result.cold),
        applied_tier=applied,
        pending_tier=pending,
        effective_at=effective_at,
        conditions=build_conditions(result.outcomes, previous, generation, now),
        history=history,
        usage=result.overage.status if result.overage is not None else None,
    )


def tier_history(result: TenantResult, previous: TenantDatabaseStatus | None, now: dt.datetime) -> list[TierChange]:
    """The tier changes so far (the last ``HISTORY_LIMIT``), and Events for this pass's."""
    decision = result.decision
    assert decision is not None
    history = list(previous.history) if previous else []
    previous_tier = previous.applied_tier if previous else None
    if previous_tier != decision.applied_tier:
        if previous_tier is not None:
            metrics.tier_changed(result.key, decision.change)
        history = [*history, TierChange(from_tier=previous_tier, to_tier=decision.applied_tier, at=now,
                                        drained_connections=result.sessions_ended or None)]
        history = history[-HISTORY_LIMIT:]
        result.events.append(
            ("Normal", "TierApplied", f"tier {decision.applied_tier} applied (was {previous_tier or 'none'})")
        )
    if decision.pending_tier and (previous is None or previous.pending_tier != decision.pending_tier):
        when = decision.effective_at.isoformat() if decision.effective_at else "?"
        result.events.append(("Normal", "DowngradeScheduled", f"downgrade to {decision.pending_tier} at {when}"))
    if decision.change == "cancelled":
        result.events.append(("Normal", "DowngradeCancelled", f"tier stays {decision.applied_tier}"))
    return history


def awake(result: TenantResult, previous: TenantDatabaseStatus | None, now: dt.datetime) -> None:
    """The Awake condition of a tenant whose tier scales to zero, and the Events when it is about to go
    Cold (``lifecycle.coldWarning``: ColdSoon, once per idle spell) and when it goes."""
    limits = result.limits
    assert limits is not None
    idle_timeout = limits.lifecycle.idle_timeout
    if idle_timeout is None or result.tenant.spec.suspended:
        return
    before = was_cold(previous)
    if result.activity_unknown is not None:  # the last verdict holds, and says why
        why = f"activity could not be read ({result.activity_unknown}); stays {'Cold' if result.cold else 'Active'}"
        result.outcomes.append(Outcome("Awake", not result.cold, "ActivityUnknown", why, advisory=result.cold))
        return
    if result.cold:
        result.outcomes.append(Outcome("Awake", False, "IdleTimeout", idle_message(idle_timeout), advisory=True))
        if not before:
            result.events.append(("Normal", "TenantCold", idle_message(idle_timeout)))
            metrics.COLD_TRANSITIONS.labels("cold").inc()
        return
    warning = cold_soon_message(limits.lifecycle.cold_warning, result.cold_at, now)
    if warning is None:
        result.outcomes.append(Outcome("Awake", True, "Active", f"queried within {idle_timeout}"))
        return
    result.outcomes.append(Outcome("Awake", True, "ColdSoon", warning))
    shown = previous.condition("Awake") if previous is not None else None
    if shown is None or (shown.reason, shown.message) != ("ColdSoon", warning):
        result.events.append(("Normal", "ColdSoon", warning))


def woke(result: TenantResult, previous: TenantDatabaseStatus | None) -> None:
    if was_cold(previous) and not result.cold:
        result.events.append(("Normal", "TenantWoke", "a connection arrived; tenant is active again"))
        metrics.COLD_TRANSITIONS.labels("woke").inc()


def usage(result: TenantResult, previous: TenantDatabaseStatus | None) -> None:
    """The UsageWithinPlan condition and its Events (decided in desired.overage); metrics here."""
    verdict, limits = result.overage, result.limits
    if verdict is None or limits is None:  # nothing included (any more): no usage series
        metrics.set_restricted(result.key, "", None)
        metrics.set_usage_ratio(result.key, "", None)
        return
    judged = usage_outcome(verdict, limits.billing, previous.usage if previous is not None else None)
    result.outcomes.append(Outcome("UsageWithinPlan", judged.ok, judged.reason, judged.message,
                                   advisory=judged.advisory))
    if judged.crossed is not None:
        metrics.USAGE_THRESHOLDS.labels(limits.tier, judged.crossed).inc()
    result.events.extend(judged.events)
    metrics.set_restricted(result.key, limits.tier, verdict.status.restriction)
