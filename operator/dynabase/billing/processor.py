"""One verified Stripe event, start to finish: dedupe, interpret, order, declare, remember.

Response codes are chosen for Stripe's retry behaviour (it retries any non-2xx
for up to three days):
- 200 for everything that will never succeed on retry (unknown price, event type
  not handled, no org metadata): retrying would only page someone in three days.
- 404 when no TenantDatabase declares the org yet: the tenant may still be
  provisioning, and the retry applies the tier once it exists.
- 503 when Kubernetes or git failed: transient, the retry applies it.
The event is remembered only when it is final, so a retry is never refused as a duplicate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from .config import BillingConfig
from .events import Ignored, TierChangeRequest, interpret
from .ledger import AppliedMark, EventLedger
from .sinks import SinkError, TenantNotFound, TierSink

log = logging.getLogger(__name__)

EVENTS = Counter(
    "dynabase_stripe_events_total", "Stripe webhook deliveries by outcome.", ["outcome"],
)
HANDLING = Histogram(
    "dynabase_stripe_event_seconds", "From a verified delivery to its response (tier declared, or not).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


@dataclass(frozen=True)
class Handled:
    status: int
    outcome: str
    detail: str = ""


class WebhookProcessor:
    def __init__(self, config: BillingConfig, ledger: EventLedger, sink: TierSink) -> None:
        self.config, self.ledger, self.sink = config, ledger, sink
        # Events of one org are handled one at a time, so the ordering check sees the latest mark.
        self._org_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def handle(self, event: Mapping[str, Any]) -> Handled:
        with HANDLING.time():
            handled = await self._handle(event)
        EVENTS.labels(handled.outcome).inc()
        log.info("stripe event", extra={"event_id": str(event.get("id", "")), "event_type": str(event.get("type", "")),
                                        "outcome": handled.outcome, "detail": handled.detail})
        return handled

    async def _handle(self, event: Mapping[str, Any]) -> Handled:
        event_id = str(event.get("id") or "")
        if event_id and await self.ledger.seen(event_id):
            return Handled(200, "duplicate", "already processed")
        decision = interpret(event, self.config)
        if isinstance(decision, Ignored):
            if decision.event_id:
                await self.ledger.record(decision.event_id, "ignored", decision.org_id)
            return Handled(200, "ignored", decision.reason)
        async with self._org_locks[decision.org_id]:
            return await self._declare(decision)

    async def _declare(self, request: TierChangeRequest) -> Handled:
        if await self.ledger.seen(request.event_id):  # a concurrent delivery of the same event won
            return Handled(200, "duplicate", "already processed")
        if request.customer_id:
            # Who pays for the org, for the month-end close; an older event never overwrites a newer one.
            await self.ledger.record_customer(request.org_id, request.customer_id, request.created)
        last = await self.ledger.last_applied(request.org_id)
        if last is not None and request.created < last.created:
            await self.ledger.record(request.event_id, "superseded", request.org_id)
            return Handled(200, "superseded", f"older than the last applied event of {request.org_id}")
        if (request.ends_subscription and last is not None and last.subscription_id
                and last.subscription_id != request.subscription_id):
            # The org moved to another subscription; the old one ending must not downgrade it.
            await self.ledger.record(request.event_id, "ignored", request.org_id)
            return Handled(200, "ignored", "an earlier subscription of the org ended")
        try:
            result = await self.sink.apply(request)
        except TenantNotFound as exc:
            return Handled(404, "tenant_not_found", str(exc))
        except SinkError as exc:
            log.warning("declaring the tier failed; Stripe will retry", extra={"event_id": request.event_id,
                                                                              "error": str(exc)})
            return Handled(503, "error", "declaring the tier failed; retry later")
        await self.ledger.record(request.event_id, result.outcome.value, request.org_id,
                                 AppliedMark(request.created, request.subscription_id))
        return Handled(200, result.outcome.value, f"{request.org_id} -> {request.tier} in {', '.join(result.targets)}")
