"""Failures: retrying transient ones, describing them, and the one way they become conditions."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import asyncpg

from .conditions import Outcome
from .results import TenantResult

log = logging.getLogger(__name__)
T = TypeVar("T")

OBSERVE_FAILED = "ObserveFailed"  # the reason of a condition whose backend could not be read this pass
# Reasons that mean this pass does not know a backend's state for the tenant (a secret store that
# cannot answer leaves the tenant's users unwritten): nothing it recorded before is lifted or reset.
UNKNOWN_REASONS = frozenset({OBSERVE_FAILED, "SecretUnavailable"})

_TRANSIENT = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
              asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


async def with_retries(fn: Callable[[], Awaitable[T]], *, attempts: int = 3, base_delay: float = 0.2) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except _TRANSIENT:
            if attempt == attempts:
                raise
            await asyncio.sleep(base_delay * 2 ** (attempt - 1) * (1 + random.random() / 2))
    raise AssertionError("unreachable")


def describe_error(exc: BaseException) -> str:
    """Error text for conditions: the driver's message, never the statement (it may hold a verifier)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
    return f"{type(exc).__name__}: {exc}"


def record_failure(results: Iterable[TenantResult], condition: str, reason: str, exc: BaseException,
                   *, event: str | None = None) -> None:
    """``exc`` as each tenant's False ``condition`` (and a Warning ``event`` if named); never the pass's end."""
    message = describe_error(exc)
    keys = []
    for result in results:
        keys.append(result.key)
        result.outcomes.append(Outcome(condition, False, reason, message))
        if event is not None:
            result.events.append(("Warning", event, message))
    if keys:
        log.warning("%s %s", condition, reason, extra={"tenants": len(keys), "tenant": keys[0], "error": message})


def unobserved(result: TenantResult) -> list[Outcome]:
    """The tenant's failed conditions that say a backend could not be read this pass."""
    return [o for o in result.outcomes if not o.ok and o.reason in UNKNOWN_REASONS]
