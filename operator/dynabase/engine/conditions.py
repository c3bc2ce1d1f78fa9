"""Status conditions and phase from per-backend outcomes (CloudNativePG style:
one condition per concern, plus Ready)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dynabase.spec import Condition, TenantDatabaseStatus
from dynabase.spec.tenant import ConditionStatus


@dataclass(frozen=True)
class Outcome:
    """What one backend did for one tenant in one pass."""

    condition_type: str
    ok: bool
    reason: str
    message: str = ""
    # Shown as its own False condition but not held against Ready: a known limit of the
    # server (FerretDB's missing roles), not something a reconcile can fix.
    advisory: bool = False
    # The condition's status when it is not simply ok's: a condition whose True is the
    # abnormal state (DirectAccess=True: a tenant can go around the proxy), or Unknown.
    status: ConditionStatus | None = None


def build_conditions(
    outcomes: list[Outcome], previous: TenantDatabaseStatus | None, generation: int | None, now: dt.datetime
) -> list[Condition]:
    """Conditions keep their lastTransitionTime while their status stays the same."""
    out: list[Condition] = []
    for outcome in outcomes:
        out.append(make_condition(outcome.condition_type, outcome.ok, outcome.reason, outcome.message,
                                  previous, generation, now, status=outcome.status))
    failing = [o for o in outcomes if not o.ok and not o.advisory]
    notes = [f"{o.condition_type}: {o.reason}" for o in outcomes if not o.ok and o.advisory]
    if failing:
        ready = make_condition(
            "Ready", False, failing[0].reason,
            "; ".join(f"{o.condition_type}: {o.message or o.reason}" for o in failing),
            previous, generation, now,
        )
    else:
        message = "all backends match the declared tier"
        if notes:
            message += " (advisory: " + "; ".join(notes) + ")"
        ready = make_condition("Ready", True, "Reconciled", message, previous, generation, now)
    out.append(ready)
    return out


def make_condition(
    type_: str, ok: bool, reason: str, message: str,
    previous: TenantDatabaseStatus | None, generation: int | None, now: dt.datetime,
    *, status: ConditionStatus | None = None,
) -> Condition:
    status = status or ("True" if ok else "False")
    before = previous.condition(type_) if previous else None
    since = before.last_transition_time if before is not None and before.status == status else now
    return Condition(
        type=type_, status=status, reason=reason, message=message[:1024],
        last_transition_time=since, observed_generation=generation,
    )
