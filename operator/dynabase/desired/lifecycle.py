"""Scale to zero: when a tenant counts as idle. Pure.

Activity is the proxy's: the time of the last query any replica forwarded. A
tenant with no recorded activity is measured from when its tier was last
applied, so a new tenant is not Cold the moment it is created.
"""

from __future__ import annotations

import datetime as dt

from dynabase.spec.tenant import TenantDatabaseStatus
from dynabase.spec.units import Duration


def is_cold(idle_timeout: Duration | None, last_query: dt.datetime | None, active_since: dt.datetime | None,
            now: dt.datetime) -> bool:
    if idle_timeout is None:
        return False  # tiers without idleTimeout never go Cold
    reference = max((t for t in (last_query, active_since) if t is not None), default=None)
    if reference is None:
        return False
    return now - reference >= dt.timedelta(milliseconds=idle_timeout.milliseconds)


def goes_cold_at(idle_timeout: Duration | None, last_query: dt.datetime | None,
                 active_since: dt.datetime | None) -> dt.datetime | None:
    """When the tenant goes Cold unless it is queried first (None: it never does, or nothing says yet)."""
    reference = max((t for t in (last_query, active_since) if t is not None), default=None)
    if idle_timeout is None or reference is None:
        return None
    return reference + dt.timedelta(milliseconds=idle_timeout.milliseconds)


def cold_soon_message(cold_warning: Duration | None, cold_at: dt.datetime | None, now: dt.datetime) -> str | None:
    """The warning once the tenant is within ``cold_warning`` of going Cold (``lifecycle.coldWarning``), else None."""
    if cold_warning is None or cold_at is None or not (
            cold_at - dt.timedelta(milliseconds=cold_warning.milliseconds) <= now < cold_at):
        return None
    return f"no queries lately: goes Cold at {cold_at:%Y-%m-%d %H:%M:%S}Z unless it is queried before"


def idle_message(idle_timeout: Duration) -> str:
    return (f"no queries for {idle_timeout}: scaled to zero (sessions ended, dedicated service asleep); "
            "the next connection wakes it")


def phase(*, suspended: bool, ready: bool, cold: bool) -> str:
    """A resolved tenant's phase; one whose tier cannot be resolved is Degraded."""
    if suspended:
        return "Suspended"
    if not ready:
        return "Degraded"
    return "Cold" if cold else "Active"


def was_cold(previous: TenantDatabaseStatus | None) -> bool:
    """Whether the last status recorded the tenant Cold. Its Awake condition says so even when a
    failing backend made the phase Degraded: the phase alone would forget it."""
    if previous is None:
        return False
    awake = previous.condition("Awake")
    if awake is not None:
        return awake.status == "False"
    return previous.phase == "Cold"
