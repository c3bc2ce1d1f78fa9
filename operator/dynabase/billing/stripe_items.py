"""Invoice items at Stripe: the month's overage of one tenant, added to its customer's next invoice.

Each item is created with the ledger's idempotency key, so a retry of a request
Stripe already received (within its 24-hour key window) returns the same item
instead of a second one; older attempts are looked up by the key in the item's
metadata before anything is sent again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import stripe

from .config import StripeApiKey

STRIPE_API = "https://api.stripe.com"
KEY_METADATA = "dynabase_close"  # the idempotency key, also in the item's metadata


class StripeFailure(RuntimeError):
    """Stripe refused or could not be reached; the message is Stripe's (never the key)."""


@dataclass(frozen=True)
class InvoiceItem:
    """What one tenant's month puts on its customer's invoice."""

    customer_id: str
    amount_cents: int
    currency: str
    description: str
    period_start: dt.datetime
    period_end: dt.datetime
    metadata: Mapping[str, str]
    idempotency_key: str


class StripeInvoiceItems:
    def __init__(self, api_key: StripeApiKey, api_base: str | None = None, *, network_retries: int = 2) -> None:
        # The library's retries reuse our idempotency key: safe. Its client is synchronous
        # (the async one warns with this httpx); calls run in a thread.
        self._client = stripe.StripeClient(api_key.reveal(), base_addresses={"api": api_base or STRIPE_API},
                                           max_network_retries=network_retries)
        self.requests = 0  # API calls made (a call retried by the library counts once)

    async def create(self, item: InvoiceItem) -> str:
        params: dict[str, Any] = {
            "customer": item.customer_id, "amount": item.amount_cents, "currency": item.currency,
            "description": item.description, "metadata": dict(item.metadata),
            "period": {"start": int(item.period_start.timestamp()), "end": int(item.period_end.timestamp())},
        }
        self.requests += 1
        try:
            created = await asyncio.to_thread(self._client.v1.invoice_items.create, params=params,  # type: ignore[arg-type]
                                              options={"idempotency_key": item.idempotency_key})
        except stripe.StripeError as exc:
            raise StripeFailure(_describe(exc)) from None
        return str(created.id)

    async def find(self, customer_id: str, idempotency_key: str, since: dt.datetime) -> str | None:
        """The item an earlier attempt created, by the key in its metadata (Stripe keeps
        idempotency keys for 24 hours only; after that a retry would make a second item)."""
        params: dict[str, Any] = {"customer": customer_id, "limit": 100,
                                  "created": {"gte": int(since.timestamp()) - 600}}
        while True:
            self.requests += 1
            try:
                page = await asyncio.to_thread(self._client.v1.invoice_items.list, params=params)  # type: ignore[arg-type]
            except stripe.StripeError as exc:
                raise StripeFailure(_describe(exc)) from None
            for found in page.data:
                metadata = found.metadata.to_dict() if found.metadata is not None else {}
                if metadata.get(KEY_METADATA) == idempotency_key:
                    return str(found.id)
            if not page.has_more or not page.data:
                return None
            params["starting_after"] = page.data[-1].id


def _describe(exc: stripe.StripeError) -> str:
    status = f"HTTP {exc.http_status}: " if exc.http_status else ""
    return f"{status}{exc.user_message or str(exc) or type(exc).__name__}"[:300]
