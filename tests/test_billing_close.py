"""`dynabase billing close`: each tenant's overage of a month reaches stripe-mock exactly once,
through a counting proxy, with the ledger in the devstack's real Postgres and the usage in its
real Redis — across re-runs, a SIGKILL mid-run, refusals and attempts older than Stripe's key window."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.billing.close import idempotency_key
from dynabase.billing.close_ledger import CloseBusy, PostgresCloseLedger
from dynabase.billing.config import BillingConfig
from dynabase.billing.ledger import PostgresLedger
from dynabase.billing.processor import WebhookProcessor
from dynabase.billing.sinks import SinkOutcome, SinkResult
from dynabase.cli import main
from dynabase.desired.charges import month_bounds
from dynabase.settings import PLATFORM_SCHEMA_LOCK
from dynabase.usage.month import MonthReader, RedisRollups, load_declared

from .billing_helpers import (  # noqa: F401
    Tenant,
    close_cli,
    dsn_fixture,
    month_of_fixture,
    outcomes,
    query_hours,
    record_customer_now,
    run_subprocess,
    stripe_fixture,
    stripe_mock_fixture,
)
from .stripe_helpers import StripeRecorder

# -- the close ----------------------------------------------------------------------------------


def test_close_sends_each_overage_once_prorated_and_a_rerun_sends_nothing(
        month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    start = month_bounds("2002-01")[0]
    upgraded_at = start + dt.timedelta(days=10)  # 240 of 744 hours on STARTER, 504 on PRO
    tenants = [
        Tenant("pro-over", "PRO", [(5, "PRO", query_hours(150), 0), (600, "PRO", query_hours(70), 0)],
               customer="cus_pro"),
        # 20 vCPU-hours while on STARTER (8.06 included there), 100 on PRO (135.48 included there).
        Tenant("moved", "PRO", [(10, "STARTER", query_hours(20), 0), (300, "PRO", query_hours(100), 0)],
               history=[(None, "STARTER", start - dt.timedelta(days=40)), ("STARTER", "PRO", upgraded_at)],
               customer="cus_moved"),
        Tenant("within", "STARTER", [(7, "STARTER", query_hours(10), 0)], customer="cus_within"),
        Tenant("free-over", "FREE", [(8, "FREE", query_hours(9), 0)]),  # FREE sells no overage
        Tenant("no-customer", "STARTER", [(9, "STARTER", query_hours(30), 0)]),
        Tenant("refused", "STARTER", [(11, "STARTER", query_hours(27), 0)], customer="cus_gone"),
        Tenant("deleted", "STARTER", [(12, "STARTER", query_hours(40), 0)], declared=False),
    ]
    month = month_of("2002-01", tenants)
    model = month.seed()
    stripe.behaviour.refuse_tenants = {"bill/refused"}

    code, first, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 1, err  # two tenants are still pending
    assert first["modelVersion"] == model.version and not first["closed"]
    assert outcomes(first) == {"bill/pro-over": "sent", "bill/moved": "sent", "bill/within": "no overage",
                               "bill/free-over": "no overage", "bill/no-customer": "pending: no Stripe customer",
                               "bill/refused": "pending: Stripe refused",
                               "bill/deleted": "not invoiced: no longer declared, no organisation"}
    assert "bill/no-customer: pending: no Stripe customer" in err and "org-no-customer" in err
    assert "bill/refused: pending: Stripe refused: HTTP 400" in err and "No such customer" in err
    assert "bill/deleted: not invoiced" in err and "invoice it by hand" in err
    items = {r.tenant: r for r in stripe.items()}
    assert sorted(items) == ["bill/moved", "bill/pro-over", "bill/refused"]
    assert first["requests"] == len(stripe.requests) == 3
    # 220 vCPU-hours on PRO: 20 over at $0.12; the move: (20 - 25 * 240/744) over at $0.15 = $1.79.
    expected = {"bill/pro-over": ("cus_pro", 240), "bill/moved": ("cus_moved", 179)}
    start_ts, end_ts = (str(int(x.timestamp())) for x in month_bounds("2002-01"))
    for tenant, (customer, cents) in expected.items():
        sent = items[tenant]
        assert (sent.form["customer"], sent.form["amount"], sent.form["currency"]) == (customer, str(cents), "usd")
        assert sent.idempotency_key == idempotency_key("2002-01", tenant) == sent.form["metadata[dynabase_close]"]
        assert (sent.form["period[start]"], sent.form["period[end]"]) == (start_ts, end_ts)
        assert sent.form["metadata[cost_model_version]"] == str(model.version)
    assert "over STARTER's 8.06 included at $0.15" in items["bill/moved"].form["description"]
    ledger = month.entries()
    assert ledger["bill/moved"].state == "sent" and ledger["bill/moved"].stripe_id.startswith("ii_")
    assert ledger["bill/refused"].state == "pending" and "No such customer" in ledger["bill/refused"].last_error
    assert ledger["bill/within"].state == "nothing" and ledger["bill/within"].amount_cents == 0

    # The org of "no-customer" subscribes; the refused customer is fixed at Stripe: only those two go.
    record_customer_now(month.dsn, "org-no-customer", "cus_new")
    stripe.reset()
    code, second, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and second["closed"], err
    assert sorted(r.tenant for r in stripe.items()) == ["bill/no-customer", "bill/refused"]
    assert second["requests"] == 2
    refused = next(r for r in stripe.items() if r.tenant == "bill/refused")
    assert refused.idempotency_key == items["bill/refused"].idempotency_key  # the same key on retry
    assert refused.form == items["bill/refused"].form  # and the same request
    assert next(r for r in stripe.items() if r.tenant == "bill/no-customer").form["amount"] == str(
        round((30 - 25) * 0.15 * 100))

    stripe.reset()
    code, third, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and third["closed"] and third["requests"] == 0 and stripe.requests == [], err
    assert Counter(outcomes(third).values()) == {"already sent": 4, "no overage": 2,
                                                 "not invoiced: no longer declared, no organisation": 1}
    assert month.entries()["bill/deleted"].amount_cents == 225  # (40 - 25) x $0.15, recorded for a person


def test_killed_mid_run_the_next_run_sends_the_rest_and_reuses_the_key(
        month_of: Any, stripe: StripeRecorder) -> None:
    tenants = [Tenant(f"t{i}", "STARTER", [(i, "STARTER", query_hours(25 + i + 1), 0)], customer=f"cus_{i}")
               for i in range(6)]
    month = month_of("2002-02", tenants)
    month.seed()

    killed = run_subprocess(month, stripe)
    stripe.behaviour.victim, stripe.behaviour.kill_after_items = killed, 3
    killed.communicate(timeout=120)
    assert killed.returncode == -9  # SIGKILL, right after stripe-mock created the third item
    first_run = list(stripe.requests)
    assert [r.tenant for r in first_run] == ["bill/t0", "bill/t1", "bill/t2"]
    ledger = month.entries()
    assert [ledger[f"bill/t{i}"].state for i in range(6)] == ["sent", "sent", "pending", "pending", "pending",
                                                              "pending"]
    assert ledger["bill/t2"].attempts == 1 and ledger["bill/t2"].attempted_at is not None  # maybe sent
    assert ledger["bill/t3"].attempts == 0

    stripe.behaviour = type(stripe.behaviour)()
    resumed = run_subprocess(month, stripe)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    result = json.loads(out)
    assert result["closed"] and result["requests"] == 4  # t2 again (same key), t3, t4, t5
    assert outcomes(result) == {"bill/t0": "already sent", "bill/t1": "already sent", "bill/t2": "sent",
                                "bill/t3": "sent", "bill/t4": "sent", "bill/t5": "sent"}

    items = stripe.items()
    per_tenant = Counter(r.tenant for r in items)
    keys = {tenant: {r.idempotency_key for r in items if r.tenant == tenant} for tenant in per_tenant}
    assert per_tenant == {"bill/t0": 1, "bill/t1": 1, "bill/t2": 2, "bill/t3": 1, "bill/t4": 1, "bill/t5": 1}
    # Every tenant reached Stripe under one key: the retried t2 is Stripe's replay of the same request.
    assert all(len(k) == 1 for k in keys.values()) and len({k for ks in keys.values() for k in ks}) == 6
    t2 = [r for r in items if r.tenant == "bill/t2"]
    assert t2[0].form == t2[1].form and t2[0].form["amount"] == str(round((3 * 0.15) * 100))

    stripe.reset()
    again = run_subprocess(month, stripe)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["requests"] == 0 and stripe.requests == [], err
    print(f"\nrequests per run: killed {len(first_run)}, resumed {result['requests']}, again 0; "
          f"per tenant {dict(per_tenant)}")


def test_an_attempt_older_than_stripes_key_window_is_looked_up_first(
        month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tenants = [Tenant("found", "STARTER", [(1, "STARTER", query_hours(30), 0)], customer="cus_found"),
               Tenant("lost", "STARTER", [(2, "STARTER", query_hours(30), 0)], customer="cus_lost")]
    month = month_of("2002-03", tenants)
    month.seed()
    code, preview, err = close_cli(month, stripe, monkeypatch, capsys, "--dry-run", "--format", "table")
    assert code == 0 and month.entries() == {} and stripe.requests == [], err  # claims and sends nothing
    assert preview["text"].splitlines() == [
        "bill/found  org-found  $0.75  would send  (bill/found 2002-03: 5.00 vCPU-h over STARTER's 25.00 "
        "included at $0.15)",
        "bill/lost  org-lost  $0.75  would send  (bill/lost 2002-03: 5.00 vCPU-h over STARTER's 25.00 "
        "included at $0.15)",
        "2002-03: 0 sent, 0 found at Stripe, 0 already sent, 0 without overage; not closed; 0 request(s) to "
        "Stripe; cost model version 1"]

    async def crashed_two_days_ago() -> None:
        """Both rows claimed and attempted, never marked sent: a crash long ago."""
        from dynabase.billing.close import charge_of

        policies, declared = load_declared([str(month.manifests)])
        proxy = ProxyBackend(month.redis_url)
        pool = await asyncpg.create_pool(month.dsn, min_size=1, max_size=2)
        ledger = await PostgresCloseLedger.open(month.dsn)
        try:
            pricing = await MonthReader(RedisRollups(proxy), PostgresStatusStore(pool),
                                        PostgresCostModels(pool)).price(month.name, policies, declared)
            await ledger.claim(month.name, [charge_of(t, month.name, pricing.model.version)
                                            for t in pricing.tenants])
            for t in tenants:
                await ledger.start_attempt(month.name, t.key, t.customer or "")
            conn = await asyncpg.connect(month.dsn)
            await conn.execute("UPDATE dynabase.billing_close SET attempted_at = now() - interval '2 days'")
            await conn.close()
        finally:
            await ledger.close()
            await pool.close()
            await proxy.close()

    asyncio.run(crashed_two_days_ago())
    # Stripe lists "found"'s item (its key in the metadata); "lost" is not there and is sent again.
    stripe.behaviour.list_item_key = idempotency_key("2002-03", "bill/found")
    code, doc, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 0 and doc["closed"], err
    assert outcomes(doc) == {"bill/found": "found at Stripe", "bill/lost": "sent"}
    methods = [(r.method, r.path, r.query.get("customer") or r.form.get("customer")) for r in stripe.requests]
    assert methods == [("GET", "/v1/invoiceitems", "cus_found"), ("GET", "/v1/invoiceitems", "cus_lost"),
                       ("POST", "/v1/invoiceitems", "cus_lost")]
    assert stripe.items()[0].idempotency_key == idempotency_key("2002-03", "bill/lost")
    assert month.entries()["bill/found"].state == "sent"


# -- the customer mapping, the schema lock, the headless hook --------------------------------------


class AcceptingSink:
    async def apply(self, request: Any) -> SinkResult:
        return SinkResult(SinkOutcome.UNCHANGED, ("bill/x",))

    def describe(self) -> str:
        return "nowhere"

    async def close(self) -> None:
        return None


async def test_subscription_events_record_the_orgs_customer(dsn: str) -> None:
    config = BillingConfig.model_validate({"prices": {"price_pro": "PRO"}})
    ledger = await PostgresLedger.open(dsn)
    processor = WebhookProcessor(config, ledger, AcceptingSink())

    def event(customer: Any, created: int) -> dict[str, Any]:
        return {"id": f"evt_{uuid.uuid4().hex}", "type": "customer.subscription.updated", "created": created,
                "data": {"object": {"id": "sub_1", "object": "subscription", "status": "active",
                                    "customer": customer, "metadata": {"org_id": "org-a"},
                                    "items": {"data": [{"price": {"id": "price_pro", "product": "prod"}}]}}}}
    try:
        assert (await processor.handle(event("cus_old", 100))).status == 200
        assert await ledger.customers(["org-a", "org-b"]) == {"org-a": "cus_old"}
        await processor.handle(event({"id": "cus_new", "object": "customer"}, 200))  # expanded customer
        await processor.handle(event("cus_stale", 150))  # delivered late: older than the last one
        assert await ledger.customers(["org-a"]) == {"org-a": "cus_new"}
    finally:
        await ledger.close()


async def test_billing_tables_are_created_under_the_platform_schema_lock(dsn: str) -> None:
    holder = await asyncpg.connect(dsn)
    await holder.execute("SELECT pg_advisory_lock($1)", PLATFORM_SCHEMA_LOCK)
    opening = [asyncio.create_task(PostgresCloseLedger.open(dsn)), asyncio.create_task(PostgresLedger.open(dsn))]
    # Both wait for the lock (and create nothing) while another creator holds it.
    while await holder.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") < 2:
        done, _ = await asyncio.wait(opening, timeout=0.05)
        assert not done, [t.result() for t in done]
    assert await holder.fetchval("SELECT to_regclass('dynabase.billing_close')") is None
    await holder.execute("SELECT pg_advisory_unlock($1)", PLATFORM_SCHEMA_LOCK)
    opened = await asyncio.gather(*opening)
    assert await holder.fetchval("SELECT to_regclass('dynabase.billing_close') IS NOT NULL")
    assert await holder.fetchval("SELECT to_regclass('dynabase.stripe_customers') IS NOT NULL")
    for ledger in opened:
        await ledger.close()
    # Many creators on a fresh schema at once: none fails on the catalog.
    await holder.execute("DROP SCHEMA dynabase CASCADE")
    ledgers = await asyncio.gather(*(PostgresCloseLedger.open(dsn) for _ in range(6)),
                                   *(PostgresLedger.open(dsn) for _ in range(6)))
    for ledger in ledgers:
        await ledger.close()
    await holder.close()


async def test_a_second_close_of_the_same_month_waits_its_turn(dsn: str) -> None:
    first, second = await PostgresCloseLedger.open(dsn), await PostgresCloseLedger.open(dsn)
    try:
        await first.lock_month("2002-06")
        with pytest.raises(CloseBusy, match="another billing close of 2002-06 is running"):
            await second.lock_month("2002-06")
        await second.lock_month("2002-07")  # another month is another lock
        await first.unlock_month("2002-06")
        await second.lock_month("2002-06")
    finally:
        await first.close()
        await second.close()


def test_close_refuses_what_it_cannot_do(month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    month = month_of("2002-08", [Tenant("x", "STARTER")])
    this_month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    month.name = this_month
    code, _, err = close_cli(month, stripe, monkeypatch, capsys)
    assert code == 1 and f"month {this_month} can be closed from" in err
    month.name = "2002-08"
    monkeypatch.delenv("DYNABASE_STRIPE_API_KEY")
    assert main(["billing", "close", "--month", "2002-08", "--manifests", str(month.manifests),
                 "--postgres-dsn", month.dsn]) == 1
    assert "set DYNABASE_STRIPE_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["billing", "close", "--month", "2002-13", "--kube"])
    assert "expected YYYY-MM" in capsys.readouterr().err
    assert stripe.requests == []

