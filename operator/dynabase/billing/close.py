"""`dynabase billing close`: each tenant's overage of a month, to Stripe, exactly once.

The month is priced like the usage report prices it (``dynabase.desired.charges``:
hours per tier from the status history, usage per tier from the metered hours,
the stored cost model in force), and each tenant's overage becomes one Stripe
invoice item on its organisation's customer (known from the subscription events
``dynabase webhooks`` handles). The base fee is the subscription's own price:
Stripe bills and prorates it, so only the overage is sent.

Exactly once: the ledger (``close_ledger``) records every tenant's charge before
anything is sent and fixes its amount and idempotency key; a re-run — after a
crash, a failure or by the schedule — sends only what is still pending, with the
same key. Runs of one month are serialised by an advisory lock.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynabase.desired.charges import MonthPricing, TenantMonth, month_bounds

from .close_ledger import Charge, Entry, PostgresCloseLedger
from .config import StripeApiKey
from .ledger import PostgresLedger
from .stripe_items import KEY_METADATA, InvoiceItem, StripeFailure, StripeInvoiceItems

log = logging.getLogger(__name__)
CURRENCY = "usd"  # TierPolicy prices are in USD
# Stripe keeps an idempotency key at least 24 hours; an attempt older than this is looked up first.
REPLAY_WINDOW = dt.timedelta(hours=23)
# After the month's end: the proxies' last hourly counters and the engine's copy to MongoDB land.
SETTLE = dt.timedelta(hours=1)


class Customers(Protocol):
    async def customers(self, org_ids: list[str]) -> dict[str, str]: ...


class InvoiceItems(Protocol):
    requests: int

    async def create(self, item: InvoiceItem) -> str: ...

    async def find(self, customer_id: str, idempotency_key: str, since: dt.datetime) -> str | None: ...


class Outcome(enum.Enum):
    SENT = "sent"
    ALREADY_SENT = "already sent"
    FOUND = "found at Stripe"  # an earlier attempt's item, beyond Stripe's key window
    NOTHING = "no overage"
    UNBILLABLE = "not invoiced: no longer declared, no organisation"
    NO_CUSTOMER = "pending: no Stripe customer"
    FAILED = "pending: Stripe refused"
    WOULD_SEND = "would send"  # --dry-run


@dataclass(frozen=True)
class TenantOutcome:
    tenant: str
    org_id: str | None
    outcome: Outcome
    amount_cents: int
    detail: str = ""


@dataclass
class CloseResult:
    month: str
    outcomes: list[TenantOutcome] = field(default_factory=list)
    requests: int = 0  # API requests to Stripe in this run
    closed: bool = False  # every tenant sent or without overage
    model_version: int | None = None

    def count(self, *outcomes: Outcome) -> int:
        return sum(o.outcome in outcomes for o in self.outcomes)

    def summary(self) -> str:
        pending = self.count(Outcome.NO_CUSTOMER, Outcome.FAILED)
        model = f"; cost model version {self.model_version}" if self.model_version is not None else ""
        state = "closed" if self.closed else f"{pending} pending" if pending else "not closed"
        return (f"{self.month}: {self.count(Outcome.SENT)} sent, {self.count(Outcome.FOUND)} found at Stripe, "
                f"{self.count(Outcome.ALREADY_SENT)} already sent, {self.count(Outcome.NOTHING)} without overage; "
                f"{state}; {self.requests} request(s) to Stripe{model}")

    def render(self) -> str:
        lines = [f"{o.tenant}  {o.org_id or '-'}  ${o.amount_cents / 100:.2f}  {o.outcome.value}"
                 + (f"  ({o.detail})" if o.detail else "") for o in self.outcomes]
        return "\n".join([*lines, self.summary()])

    def document(self) -> dict[str, Any]:
        return {"month": self.month, "closed": self.closed, "requests": self.requests,
                "modelVersion": self.model_version,
                "tenants": [{"tenant": o.tenant, "orgId": o.org_id, "outcome": o.outcome.value,
                             "amountCents": o.amount_cents, "detail": o.detail} for o in self.outcomes]}


# -- what a tenant's month becomes ------------------------------------------------------------


def idempotency_key(month: str, tenant: str) -> str:
    """Stable for (month, tenant), and short whatever the tenant's name."""
    return f"dynabase-close-{month}-{hashlib.sha256(tenant.encode()).hexdigest()[:32]}"


def describe(charged: TenantMonth, month: str) -> str:
    parts = [f"{p.overage_vcpu_hours:.2f} vCPU-h over {p.tier}'s {p.included_vcpu_hours:.2f} included "
             f"at ${p.overage_price_usd:g}" for p in charged.parts if p.overage_usd > 0 and p.overage_price_usd]
    return f"{charged.tenant} {month}: " + ("; ".join(parts) or "no overage")


def charge_of(charged: TenantMonth, month: str, model_version: int) -> Charge:
    detail = {
        "vcpuHours": round(charged.vcpu_hours, 6), "includedVcpuHours": round(charged.included_vcpu_hours, 6),
        "overageVcpuHours": round(charged.overage_vcpu_hours, 6), "tierAtEnd": charged.tier,
        "parts": [{"tier": p.tier, "hours": round(p.hours, 4), "vcpuHours": round(p.vcpu_hours, 6),
                   "includedVcpuHours": round(p.included_vcpu_hours, 6),
                   "overageVcpuHours": round(p.overage_vcpu_hours, 6), "priceUSD": p.overage_price_usd,
                   "overageUSD": round(p.overage_usd, 6)} for p in charged.parts],
    }
    return Charge(tenant=charged.tenant, org_id=charged.org_id, amount_cents=charged.overage_cents,
                  currency=CURRENCY, description=describe(charged, month)[:500], detail=detail,
                  model_version=model_version, idempotency_key=idempotency_key(month, charged.tenant))


def invoice_item(entry: Entry, customer_id: str) -> InvoiceItem:
    start, end = month_bounds(entry.month)
    metadata = {KEY_METADATA: entry.idempotency_key, "month": entry.month, "tenant": entry.tenant,
                "org_id": entry.org_id or "", "overage_vcpu_hours": str(entry.detail.get("overageVcpuHours", "")),
                "cost_model_version": str(entry.model_version)}
    return InvoiceItem(customer_id, entry.amount_cents, entry.currency, entry.description, start, end, metadata,
                       entry.idempotency_key)


def check_month_ended(month: str, now: dt.datetime) -> None:
    """ValueError when the month cannot be closed yet (or is not YYYY-MM)."""
    end = month_bounds(month)[1]
    if now < end + SETTLE:
        raise ValueError(f"month {month} can be closed from {end + SETTLE:%Y-%m-%d %H:%MZ} (an hour after it "
                         "ends, when its last usage is in); pass an earlier --month")


# -- the run ------------------------------------------------------------------------------------


async def close_month(month: str, price: Callable[[], Awaitable[MonthPricing]], ledger: PostgresCloseLedger,
                      customers: Customers, items: InvoiceItems, now: dt.datetime) -> CloseResult:
    result = CloseResult(month)
    await ledger.lock_month(month)
    try:
        if await ledger.closed(month):
            result.outcomes = [_settled(e) for e in await ledger.entries(month)]
            result.closed = True
            return result
        pricing = await price()
        result.model_version = pricing.model.version
        entries = await ledger.claim(month, [charge_of(t, month, pricing.model.version) for t in pricing.tenants])
        pending = [e for e in entries if e.state == "pending"]
        known = await customers.customers(sorted({e.org_id for e in pending if e.org_id and not e.customer_id}))
        for entry in entries:
            if entry.state != "pending":
                result.outcomes.append(_settled(entry))
                continue
            customer = entry.customer_id or known.get(entry.org_id or "")
            result.outcomes.append(await _send(entry, customer, ledger, items, now))
        result.closed = await ledger.finish(month)
    finally:
        result.requests = items.requests
        await ledger.unlock_month(month)
    return result


def _settled(entry: Entry) -> TenantOutcome:
    if entry.state == "sent":
        return TenantOutcome(entry.tenant, entry.org_id, Outcome.ALREADY_SENT, entry.amount_cents,
                             entry.stripe_id or "")
    if entry.state == "unbillable":
        return TenantOutcome(entry.tenant, None, Outcome.UNBILLABLE, entry.amount_cents,
                             "metered this month but no TenantDatabase declares it now; invoice it by hand")
    return TenantOutcome(entry.tenant, entry.org_id, Outcome.NOTHING, 0)


async def _send(entry: Entry, customer: str | None, ledger: PostgresCloseLedger, items: InvoiceItems,
                now: dt.datetime) -> TenantOutcome:
    def outcome(kind: Outcome, detail: str = "") -> TenantOutcome:
        return TenantOutcome(entry.tenant, entry.org_id, kind, entry.amount_cents, detail)

    if customer is None:
        return outcome(Outcome.NO_CUSTOMER, f"no subscription event has named the customer of org "
                                            f"{entry.org_id or '?'} yet; it is sent by a later run once one has")
    try:
        if entry.attempted_at is not None and now - entry.attempted_at > REPLAY_WINDOW:
            found = await items.find(customer, entry.idempotency_key, entry.attempted_at)
            if found is not None:
                await ledger.sent(entry.month, entry.tenant, found)
                return outcome(Outcome.FOUND, found)
        await ledger.start_attempt(entry.month, entry.tenant, customer)
        item_id = await items.create(invoice_item(entry, customer))
    except StripeFailure as exc:
        await ledger.failed(entry.month, entry.tenant, str(exc))
        log.warning("invoice item refused", extra={"tenant": entry.tenant, "error": str(exc)})
        return outcome(Outcome.FAILED, str(exc))
    await ledger.sent(entry.month, entry.tenant, item_id)
    return outcome(Outcome.SENT, item_id)


async def dry_run(month: str, pricing: MonthPricing, ledger: PostgresCloseLedger) -> CloseResult:
    """What a close would do now; nothing is written or sent."""
    recorded = {e.tenant: e for e in await ledger.entries(month)}
    result = CloseResult(month, model_version=pricing.model.version)
    for charged in pricing.tenants:
        entry = recorded.get(charged.tenant)
        if entry is not None and entry.state != "pending":
            result.outcomes.append(_settled(entry))
        elif charged.org_id is None and charged.overage_cents > 0:
            result.outcomes.append(TenantOutcome(charged.tenant, None, Outcome.UNBILLABLE, charged.overage_cents))
        elif (entry.amount_cents if entry else charged.overage_cents) > 0:
            result.outcomes.append(TenantOutcome(charged.tenant, charged.org_id, Outcome.WOULD_SEND,
                                                 entry.amount_cents if entry else charged.overage_cents,
                                                 entry.description if entry else describe(charged, month)))
        else:
            result.outcomes.append(TenantOutcome(charged.tenant, charged.org_id, Outcome.NOTHING, 0))
    return result


@dataclass(frozen=True)
class StripeSettings:
    api_key: StripeApiKey
    api_base: str | None = None  # stripe-mock in tests; Stripe's API otherwise


async def run_close(month: str, price: Callable[[], Awaitable[MonthPricing]], postgres_dsn: str,
                    stripe: StripeSettings | None, *, now: dt.datetime | None = None,
                    preview: bool = False) -> CloseResult:
    """Open the ledgers and Stripe, close ``month`` (or preview it: no Stripe needed). Raises
    ValueError for a month that cannot be closed yet, CloseBusy when another run holds it,
    OSError/psycopg errors."""
    now = now or dt.datetime.now(dt.UTC)
    check_month_ended(month, now)
    ledger = await PostgresCloseLedger.open(postgres_dsn, read_only=preview)
    try:
        if preview or stripe is None:
            return await dry_run(month, await price(), ledger)
        customers = await PostgresLedger.open(postgres_dsn, prune=False)
        try:
            items = StripeInvoiceItems(stripe.api_key, stripe.api_base)
            result = await close_month(month, price, ledger, customers, items, now)
        finally:
            await customers.close()
    finally:
        await ledger.close()
    log.info("billing close", extra={"month": month, "closed": result.closed, "requests": result.requests,
                                     "sent": result.count(Outcome.SENT)})
    return result


def render(result: CloseResult, output_format: str) -> str:
    return json.dumps(result.document(), indent=2) if output_format == "json" else result.render()


def needs_attention(result: CloseResult) -> Sequence[TenantOutcome]:
    """Pending tenants, and overage nobody can be invoiced for."""
    return [o for o in result.outcomes if o.outcome in (Outcome.NO_CUSTOMER, Outcome.FAILED, Outcome.UNBILLABLE)]
