"""Scale to zero: which tenants are idle past their tier's idleTimeout, from the proxy's activity."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping

from dynabase.backends.proxy import ProxyBackend
from dynabase.desired.lifecycle import goes_cold_at, is_cold, was_cold
from dynabase.spec import TenantDatabaseStatus

from .failures import describe_error
from .results import TenantResult

log = logging.getLogger(__name__)


def candidates(results: list[TenantResult]) -> list[TenantResult]:
    """Tenants that can go Cold: their tier has an idleTimeout and they are not suspended."""
    return [r for r in results if r.limits is not None and r.limits.lifecycle.idle_timeout is not None
            and not r.tenant.spec.suspended]


async def mark_cold(proxy: ProxyBackend | None, results: list[TenantResult],
                    statuses: Mapping[str, TenantDatabaseStatus], now: dt.datetime) -> None:
    """Set ``TenantResult.cold`` for the tenants idle past their tier's idleTimeout."""
    judged = candidates(results)
    if not judged or proxy is None:
        return  # activity comes from the proxy; without it nobody is judged idle
    try:
        activity = await proxy.activity([r.tenant.database_name for r in judged])
    except Exception as exc:
        activity_unknown(judged, statuses, exc)
        return
    for result in judged:
        assert result.limits is not None
        previous = statuses.get(result.key)
        epoch = activity.get(result.tenant.database_name)
        last_query = dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else None
        since = previous.history[-1].at if previous and previous.history else None
        result.cold = is_cold(result.limits.lifecycle.idle_timeout, last_query, since, now)
        result.cold_at = goes_cold_at(result.limits.lifecycle.idle_timeout, last_query, since)


def activity_unknown(judged: list[TenantResult], statuses: Mapping[str, TenantDatabaseStatus],
                     exc: Exception) -> None:
    """The proxy's activity could not be read: each tenant stays as it was (Cold stays Cold, Active
    stays Active), its Awake condition says why, and no Event claims that it woke or went Cold."""
    why = describe_error(exc)
    log.warning("proxy activity unavailable; tenants stay as they were", extra={"error": why, "tenants": len(judged)})
    for result in judged:
        result.cold = was_cold(statuses.get(result.key))
        result.activity_unknown = why

