"""A small async client for Railway's public GraphQL API.

Railway's limits are per request and tight (1,000 an hour on Hobby, 10,000 on
Pro), so the client keeps its own hourly budget, honours ``Retry-After`` on 429,
backs off with jitter on 5xx and network errors, and counts every request by
operation so a pass can report what it cost. Every document is a ``.graphql``
file beside this module; tests validate them against Railway's schema.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import httpx
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

log = logging.getLogger(__name__)

DEFAULT_URL = "https://backboard.railway.com/graphql/v2"
HOUR = 3600.0

REQUESTS = PromCounter("dynabase_railway_requests_total", "Railway API requests by operation and outcome.",
                       ["operation", "outcome"])
BUDGET_LEFT = Gauge("dynabase_railway_budget_remaining", "Requests left in this hour's Railway budget.")


class RailwayError(RuntimeError):
    """A failed Railway call; the message never carries the token."""


class RateLimited(RailwayError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetExhausted(RailwayError):
    pass


@dataclass(frozen=True)
class RailwayAuth:
    """A workspace/account token (``Authorization: Bearer``) or a project token (``Project-Access-Token``)."""

    token: str = field(repr=False)
    kind: Literal["account", "project"] = "account"

    def headers(self) -> dict[str, str]:
        if self.kind == "project":
            return {"Project-Access-Token": self.token}
        return {"Authorization": f"Bearer {self.token}"}

    def __str__(self) -> str:
        return f"RailwayAuth({self.kind}, token=***)"


@functools.cache
def document(operation: str) -> str:
    return (resources.files(__package__) / "graphql" / f"{operation}.graphql").read_text()


def operations() -> list[str]:
    return sorted(p.name.removesuffix(".graphql") for p in (resources.files(__package__) / "graphql").iterdir()
                  if p.name.endswith(".graphql"))


@dataclass
class RequestBudget:
    """Requests allowed per rolling hour, tightened by what Railway's X-RateLimit headers say."""

    per_hour: int
    sent: deque[float] = field(default_factory=deque)
    server_remaining: int | None = None
    server_reset_at: float = 0.0

    def remaining(self, now: float) -> int:
        while self.sent and self.sent[0] <= now - HOUR:
            self.sent.popleft()
        mine = self.per_hour - len(self.sent)
        if self.server_remaining is not None and now < self.server_reset_at:
            return min(mine, self.server_remaining)
        return mine

    def spend(self, now: float) -> None:
        self.sent.append(now)
        if self.server_remaining is not None:
            self.server_remaining -= 1

    def observe_headers(self, headers: httpx.Headers, now: float) -> None:
        remaining, reset = headers.get("x-ratelimit-remaining"), headers.get("x-ratelimit-reset")
        if remaining is not None and remaining.isdigit():
            self.server_remaining = int(remaining)
            # Reset is an epoch timestamp (seconds or milliseconds); without one, trust it for a minute.
            self.server_reset_at = now + 60
            if reset and reset.replace(".", "", 1).isdigit():
                epoch = float(reset) / (1000 if float(reset) > 1e11 else 1)
                self.server_reset_at = now + max(0.0, epoch - time.time())


class RailwayClient:
    def __init__(
        self, auth: RailwayAuth, *, url: str = DEFAULT_URL, hourly_budget: int = 1000, attempts: int = 4,
        max_wait: float = 30.0, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.budget = RequestBudget(hourly_budget)
        self.attempts = attempts
        self.max_wait = max_wait  # a Retry-After longer than this fails the call; the next pass retries
        self.requests: Counter[str] = Counter()
        self._http = httpx.AsyncClient(
            headers={**auth.headers(), "Content-Type": "application/json", "User-Agent": "dynabase"},
            timeout=timeout, transport=transport,
        )

    async def close(self) -> None:
        await self._http.aclose()

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    async def execute(self, operation: str, variables: dict[str, Any]) -> dict[str, Any]:
        body = {"query": document(operation), "variables": variables, "operationName": operation}
        for attempt in range(1, self.attempts + 1):
            now = time.monotonic()
            left = self.budget.remaining(now)
            BUDGET_LEFT.set(left)
            if left <= 0:
                REQUESTS.labels(operation, "budget").inc()
                raise BudgetExhausted(f"{operation}: the hourly Railway request budget "
                                      f"({self.budget.per_hour}) is spent; the next pass retries")
            self.budget.spend(now)
            self.requests[operation] += 1
            try:
                response = await self._http.post(self.url, json=body)
            except httpx.TransportError as exc:
                REQUESTS.labels(operation, "network").inc()
                if attempt == self.attempts:
                    raise RailwayError(f"{operation}: {type(exc).__name__} reaching Railway") from None
                await self._backoff(attempt)
                continue
            self.budget.observe_headers(response.headers, time.monotonic())
            if response.status_code == 429:
                REQUESTS.labels(operation, "429").inc()
                wait = _retry_after(response.headers)
                if wait > self.max_wait or attempt == self.attempts:
                    raise RateLimited(f"{operation}: rate limited by Railway, retry after {wait:.0f}s", wait)
                log.info("railway rate limited", extra={"operation": operation, "retry_after": wait})
                await asyncio.sleep(wait * (1 + random.random() / 10))
                continue
            if response.status_code >= 500:
                REQUESTS.labels(operation, str(response.status_code)).inc()
                if attempt == self.attempts:
                    raise RailwayError(f"{operation}: Railway answered HTTP {response.status_code}")
                await self._backoff(attempt)
                continue
            return self._data(operation, response)
        raise AssertionError("unreachable")

    @staticmethod
    async def _backoff(attempt: int) -> None:
        await asyncio.sleep(min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random()))

    @staticmethod
    def _data(operation: str, response: httpx.Response) -> dict[str, Any]:
        try:
            payload = response.json()
        except ValueError:
            REQUESTS.labels(operation, "invalid").inc()
            raise RailwayError(f"{operation}: HTTP {response.status_code} without a JSON body") from None
        errors = payload.get("errors") if isinstance(payload, dict) else None
        if errors or response.status_code >= 400:
            REQUESTS.labels(operation, "error").inc()
            messages = "; ".join(str(e.get("message", e)) for e in errors or []) or f"HTTP {response.status_code}"
            raise RailwayError(f"{operation}: {messages}")
        REQUESTS.labels(operation, "ok").inc()
        data = payload.get("data")
        if not isinstance(data, dict):
            raise RailwayError(f"{operation}: no data in the answer")
        return data


def _retry_after(headers: httpx.Headers) -> float:
    value = headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 60.0  # an HTTP date or nothing: wait a minute, as Railway's limits reset per minute or hour
