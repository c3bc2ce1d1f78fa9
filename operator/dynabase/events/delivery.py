"""The delivery loop: POST each queued notification, signed, until its endpoint answers 2xx.

At least once, never twice on purpose: a row is claimed (lease, SKIP LOCKED) before
its request leaves and marked delivered once a 2xx comes back; only a sender that
dies between the two sends it again, with the same event id for the receiver to
drop. A failure (no answer, a non-2xx, no signing secret yet) is retried with
exponential backoff and jitter up to ``max_attempts``; a tenant that no longer
declares notifications has its pending ones cancelled. Secrets are read when a
notification is sent, never stored with it, and appear in no log or ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter

from dynabase.backends.notify_pg import Claimed, NotificationLedger
from dynabase.settings import SettingsError, env_duration, env_int, secret_from_env
from dynabase.spec import TenantDatabase

from . import webhook

log = logging.getLogger(__name__)
OUTCOMES = ("delivered", "retried", "failed", "cancelled")
NOTIFICATIONS = Counter("dynabase_notifications_total", "Notification attempts by outcome", ["outcome"])
for _outcome in OUTCOMES:  # every outcome is a series from the start (0 until it happens)
    NOTIFICATIONS.labels(_outcome)


@dataclass(frozen=True)
class Endpoint:
    url: str
    secret: str = field(repr=False)

    @property
    def origin(self) -> str:
        """scheme://host[:port]: what ledgers and logs name (a path or query may hold a token)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


class EndpointUnavailable(Exception):
    """The tenant declares an endpoint that cannot be used yet (its secret is missing); retried."""


# tenant key -> its endpoint now; None when it declares none (any more).
Endpoints = Callable[[str], Awaitable[Endpoint | None]]


@dataclass(frozen=True)
class NotifySettings:
    first_retry: float = 30.0  # seconds; doubles per attempt
    max_retry: float = 6 * 3600.0
    max_attempts: int = 16  # about three days with the defaults, as Stripe retries its webhooks
    timeout: float = 10.0
    lease: float = 60.0  # a claim outlives the request's timeout
    batch: int = 20
    poll: float = 5.0  # look for due rows at least this often (other replicas queue them too)

    @classmethod
    def from_env(cls) -> NotifySettings:
        return cls(first_retry=env_duration("DYNABASE_NOTIFY_FIRST_RETRY", 30.0),
                   max_retry=env_duration("DYNABASE_NOTIFY_MAX_RETRY", 6 * 3600.0),
                   max_attempts=env_int("DYNABASE_NOTIFY_MAX_ATTEMPTS", 16, minimum=1, maximum=100),
                   timeout=env_duration("DYNABASE_NOTIFY_TIMEOUT", 10.0))

    def retry_in(self, attempts: int, jitter: float) -> float | None:
        """Seconds before the next try after ``attempts`` failed ones; None when they are used up."""
        if attempts >= self.max_attempts:
            return None
        return float(min(self.max_retry, self.first_retry * 2.0 ** (attempts - 1)) * (1 + 0.25 * jitter))


@dataclass
class Delivered:
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        NOTIFICATIONS.labels(outcome).inc()


class Deliverer:
    def __init__(self, ledger: NotificationLedger, endpoints: Endpoints, settings: NotifySettings | None = None,
                 *, client: httpx.AsyncClient | None = None, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        self.ledger, self.endpoints = ledger, endpoints
        self.settings = settings or NotifySettings()
        self._client = client
        self.clock, self.jitter = clock, jitter
        self._nudge = asyncio.Event()

    def nudge(self) -> None:
        """New rows are queued: look now instead of at the next poll."""
        self._nudge.set()

    async def deliver_due(self) -> Delivered:
        """Send every due notification once (each claimed row gets one attempt)."""
        counts = Delivered()
        client = self._client or httpx.AsyncClient(timeout=self.settings.timeout, follow_redirects=False)
        due_by = None  # what was due when this round began: a retry due meanwhile waits for the next round
        try:
            while True:
                claimed, now = await self.ledger.claim_due(self.settings.batch, self.settings.lease, due_by)
                due_by = due_by or now
                if not claimed:
                    return counts
                for outcome in await asyncio.gather(*(self._attempt(client, row) for row in claimed)):
                    counts.add(outcome)
        finally:
            if self._client is None:
                await client.aclose()

    async def _attempt(self, client: httpx.AsyncClient, row: Claimed) -> str:
        attempt = row.attempts + 1
        try:
            endpoint = await self.endpoints(row.tenant)
        except EndpointUnavailable as exc:
            return await self._failed(row, attempt, None, str(exc), None)
        if endpoint is None:
            await self.ledger.cancel(row.event_id, "the tenant no longer declares notifications")
            return "cancelled"
        raw = row.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "DynaBase-Webhooks/1",
            webhook.EVENT_ID_HEADER: row.event_id,
            webhook.ATTEMPT_HEADER: str(attempt),
            webhook.SIGNATURE_HEADER: webhook.sign(endpoint.secret, raw, int(self.clock())),
        }
        try:
            response = await client.post(endpoint.url, content=raw, headers=headers)
        except httpx.HTTPError as exc:
            return await self._failed(row, attempt, None, f"{type(exc).__name__}: {_no_url(str(exc), endpoint)}",
                                      endpoint)
        if 200 <= response.status_code < 300:
            await self.ledger.delivered(row.event_id, response.status_code, endpoint.origin)
            log.info("notification delivered", extra={"event": row.event_id, "tenant": row.tenant,
                                                      "reason": row.reason, "attempt": attempt,
                                                      "endpoint": endpoint.origin})
            return "delivered"
        return await self._failed(row, attempt, response.status_code, f"HTTP {response.status_code}", endpoint)

    async def _failed(self, row: Claimed, attempt: int, status: int | None, error: str,
                      endpoint: Endpoint | None) -> str:
        retry_in = self.settings.retry_in(attempt, self.jitter())
        await self.ledger.attempt_failed(row.event_id, status=status, error=error,
                                         endpoint=endpoint.origin if endpoint else None, retry_in=retry_in)
        log.warning("notification not delivered", extra={
            "event": row.event_id, "tenant": row.tenant, "reason": row.reason, "attempt": attempt, "error": error,
            "endpoint": endpoint.origin if endpoint else None,
            "retry_in": round(retry_in, 1) if retry_in is not None else "never (attempts used up)"})
        return "retried" if retry_in is not None else "failed"

    async def run(self, stop: asyncio.Event, when: Callable[[], bool] = lambda: True) -> None:
        """Deliver until ``stop``: whenever a row is due, nudged, or every ``poll`` seconds, while ``when()``."""
        while not stop.is_set():
            wait = self.settings.poll
            try:
                if when():
                    await self.deliver_due()
                due = await self.ledger.next_due_in()
                if due is not None:
                    wait = min(wait, due)
            except Exception as exc:  # Postgres away: try again at the next poll
                log.warning("notification delivery failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._nudge.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._nudge.wait())]
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter


def _no_url(text: str, endpoint: Endpoint) -> str:
    """An error message without the endpoint's path and query (they may hold a token)."""
    return text.replace(endpoint.url, endpoint.origin)


# -- where a tenant's endpoint is declared, in headless mode --------------------------------------


def webhook_secret_variable(tenant: TenantDatabase) -> str:
    """``DYNABASE_WEBHOOK_SECRET_<NAMESPACE>__<NAME>``, upper case, other characters as ``_``."""
    slug = f"{tenant.namespace}__{tenant.name}".upper()
    return "DYNABASE_WEBHOOK_SECRET_" + re.sub(r"[^A-Z0-9_]", "_", slug)


def declared_endpoints(lookup: Callable[[str], TenantDatabase | None]) -> Endpoints:
    """Headless mode: the URL from the tenant's declaration, the secret from its variable (or ``…_FILE``)."""

    async def endpoint(key: str) -> Endpoint | None:
        tenant = lookup(key)
        if tenant is None or tenant.spec.notifications is None:
            return None
        variable = webhook_secret_variable(tenant)
        try:
            secret = secret_from_env(variable)
        except SettingsError as exc:
            raise EndpointUnavailable(str(exc)) from None
        if not secret:
            raise EndpointUnavailable(f"no signing secret: set {variable} (or {variable}_FILE)")
        return Endpoint(tenant.spec.notifications.url, secret)

    return endpoint
