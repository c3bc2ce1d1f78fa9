"""Included usage and what happens beyond it. Pure.

Tiers that sell overage just bill it. A tier with included usage and no overage
price (FREE) warns at 80 % and 100 %, lets the tenant run over for a soft period,
then restricts it (lower QPS or read-only) until the month ends or the tenant
moves to a tier that covers its usage.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dynabase.spec.tenant import UsageStatus

from .cost import warning_level
from .effective import BillingEffective


def month_of(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m")


def month_start(now: dt.datetime) -> dt.datetime:
    return now.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class OverageVerdict:
    status: UsageStatus
    ratio: float | None  # used / included; None when the usage could not be read
    message: str
    unknown: str | None = None  # why this pass could not read the usage: the verdict is the last one, carried

    @property
    def restriction(self) -> str | None:
        return self.status.restriction


def decide_overage(billing: BillingEffective, used_vcpu_hours: float, previous: UsageStatus | None,
                   now: dt.datetime) -> OverageVerdict | None:
    """None when the tier includes no usage (nothing to warn about)."""
    included = billing.included_vcpu_hours
    if included <= 0:
        return None
    level = warning_level(used_vcpu_hours, included)
    used = f"{used_vcpu_hours:.2f} of {included:g} included vCPU-hours"
    return _verdict(billing, level, _this_month(previous, now), now, used, used_vcpu_hours / included)


def carried_overage(billing: BillingEffective, previous: UsageStatus | None, now: dt.datetime,
                    why: str) -> OverageVerdict | None:
    """The verdict of a pass that could not read the month's usage: the last one holds.

    The level, the over-since date and a restriction are carried, never lifted or
    restarted, and nothing new is claimed about the usage. What follows from rules
    alone still follows, as it would with the usage known: usage only grows within
    a month, so a soft period that ends now restricts; a tier that sells overage is
    never restricted; a new month starts clean.
    """
    if billing.included_vcpu_hours <= 0:
        return None
    before = _this_month(previous, now)
    level = before.level if before is not None else None
    known = f"{level} % of the included usage" if level else "under 80 % of the included usage"
    return _verdict(billing, level, before, now, f"usage unknown ({why}); last known {known}", None, unknown=why)


def _this_month(previous: UsageStatus | None, now: dt.datetime) -> UsageStatus | None:
    """The previous verdict if it is this month's: a new month starts clean."""
    return previous if previous is not None and previous.month == month_of(now) else None


def _verdict(billing: BillingEffective, level: str | None, before: UsageStatus | None, now: dt.datetime,
             used: str, ratio: float | None, *, unknown: str | None = None) -> OverageVerdict:
    over_since = None
    if level == "100":
        over_since = before.over_since if before is not None and before.over_since is not None else now
    restriction = None
    sells_overage = billing.overage_per_vcpu_hour_usd is not None
    soft = dt.timedelta(milliseconds=billing.soft_overage_period.milliseconds)
    if over_since is not None and not sells_overage and now - over_since >= soft:
        restriction = billing.overage_restriction
    if restriction == "qps":
        message = f"{used}; restricted to {billing.restricted_qps} queries/s until next month or an upgrade"
    elif restriction == "readOnly":
        message = f"{used}; read-only until next month or an upgrade"
    elif over_since is not None and not sells_overage:
        until = over_since + soft
        message = f"{used}; over since {over_since:%Y-%m-%d %H:%M}Z, restricted from {until:%Y-%m-%d %H:%M}Z " \
                  "unless it upgrades"
    elif over_since is not None:
        message = f"{used}; the excess is billed at {billing.overage_per_vcpu_hour_usd} USD per vCPU-hour"
    else:
        message = used
    status = UsageStatus(month=month_of(now), level=level, over_since=over_since, restriction=restriction)
    return OverageVerdict(status, ratio, message, unknown)


Event = tuple[str, str, str]  # (type, reason, message), as Kubernetes Events have them


@dataclass(frozen=True)
class UsageOutcome:
    """The UsageWithinPlan condition for one pass, and the Events announcing what changed."""

    ok: bool
    reason: str
    message: str
    advisory: bool = False  # shown as False but not held against Ready: the tenant's usage, not a fault
    crossed: str | None = None  # the warning level ("80"/"100") first reached in this pass
    events: tuple[Event, ...] = ()


def usage_outcome(verdict: OverageVerdict, billing: BillingEffective, previous: UsageStatus | None) -> UsageOutcome:
    """What this month's verdict says, against the one recorded before (``previous``)."""
    before = previous if previous is not None and previous.month == verdict.status.month else None
    status = verdict.status
    if status.restriction:
        ok, reason, advisory = False, "Restricted", True
    elif status.level == "100" and billing.overage_per_vcpu_hour_usd is None:
        ok, reason, advisory = False, "OverIncludedUsage", True
    elif status.level == "100":
        ok, reason, advisory = True, "OverageBilled", False
    elif status.level == "80":
        ok, reason, advisory = True, "NearIncludedUsage", False
    else:
        ok, reason, advisory = True, "WithinIncludedUsage", False
    if verdict.unknown is not None:  # the condition keeps its status and says why it is not measured now
        reason = "UsageUnknown"
    events: list[Event] = []
    level_before = before.level if before is not None else None
    crossed = None
    if status.level is not None and status.level != level_before and \
            (level_before is None or int(status.level) > int(level_before)):
        crossed = status.level
        reason_crossed = "IncludedUsageExceeded" if status.level == "100" else "UsageWarning"
        events.append(("Warning", reason_crossed, f"{status.level}% of the month's included usage: {verdict.message}"))
    restriction_before = before.restriction if before is not None else None
    if status.restriction and status.restriction != restriction_before:
        events.append(("Warning", "UsageRestricted", verdict.message))
    elif restriction_before and not status.restriction:
        events.append(("Normal", "UsageRestrictionLifted", verdict.message))
    return UsageOutcome(ok, reason, verdict.message, advisory, crossed, tuple(events))
