"""Month-end on a schedule: the headless hook (and `dynabase headless` end to end) closes the
previous month once, and the CronJob closes from the cluster's declarations and status."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from dynabase.backends.cost_models import PostgresCostModels
from dynabase.backends.proxy import ProxyBackend
from dynabase.backends.status_pg import PostgresStatusStore
from dynabase.billing.close import StripeSettings, run_close
from dynabase.billing.close_ledger import PostgresCloseLedger
from dynabase.billing.config import StripeApiKey
from dynabase.cli import main
from dynabase.desired.charges import month_bounds, month_hours
from dynabase.desired.sql import quote_ident
from dynabase.devstack.stack import free_port
from dynabase.headless.month_end import MonthEndClose
from dynabase.keyspace import encode_usage as encode
from dynabase.keyspace import usage_field, usage_key
from dynabase.usage.month import MonthReader, RedisRollups, load_declared

from .billing_helpers import (  # noqa: F401
    API_KEY,
    POLICY,
    Month,
    Tenant,
    dsn_fixture,
    month_of_fixture,
    outcomes,
    query_hours,
    stripe_fixture,
    stripe_mock_fixture,
)
from .conftest import ROOT, Stack
from .stripe_helpers import StripeRecorder


def test_headless_closes_the_previous_month_once_after_it_ended(
        month_of: Any, stripe: StripeRecorder) -> None:
    month = month_of("2002-05", [Tenant("hl", "STARTER", [(1, "STARTER", query_hours(26), 0)], customer="cus_hl")])
    month.seed()
    policies, declared = load_declared([str(month.manifests)])
    end = month_bounds("2002-05")[1]
    now = [end + dt.timedelta(minutes=30)]
    runs: list[bool] = []

    async def scenario() -> None:
        proxy = ProxyBackend(month.redis_url)
        pool = await asyncpg.create_pool(month.dsn, min_size=1, max_size=2)
        reader = MonthReader(RedisRollups(proxy), PostgresStatusStore(pool), PostgresCostModels(pool))

        async def close(name: str, pol: Any, ten: Any) -> bool:  # what servers.py wires for headless mode
            result = await run_close(name, lambda: reader.price(name, pol, ten), month.dsn,
                                     StripeSettings(StripeApiKey(API_KEY), stripe.url), now=now[0])
            runs.append(result.closed)
            return result.closed

        hook = MonthEndClose(close, clock=lambda: now[0])
        try:
            hook.after_pass(policies, declared)  # 30 minutes after the end: its last usage may still come
            await hook.wait()
            assert runs == []
            now[0] = end + dt.timedelta(hours=2)
            hook.after_pass(policies, declared)
            hook.after_pass(policies, declared)  # a pass while the close runs starts no second one
            await hook.wait()
            assert runs == [True] and hook.closed_month == "2002-05"
            hook.after_pass(policies, declared)  # closed: not looked at again
            await hook.wait()
            assert runs == [True]
            # A restarted replica asks the ledger once: already closed, nothing sent.
            restarted = MonthEndClose(close, clock=lambda: now[0])
            restarted.after_pass(policies, declared)
            await restarted.wait()
            assert runs == [True, True]
        finally:
            await pool.close()
            await proxy.close()

    asyncio.run(scenario())
    assert [(r.tenant, r.form["amount"]) for r in stripe.items()] == [("bill/hl", "15")]


# -- in a cluster: the CronJob's way -------------------------------------------------------------

BILLING_SA = "system:serviceaccount:dynabase-system:dynabase-billing"


@pytest.mark.kube
def test_cronjob_closes_from_the_clusters_declarations_and_status(
        stack: Stack, crds_applied: None, month_of: Any, stripe: StripeRecorder, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    stack.need("kube-apiserver")
    stack.kubectl("apply", "-k", str(ROOT / "manifests"))
    cronjob = json.loads(stack.kubectl("get", "cronjob", "dynabase-billing-close", "-n", "dynabase-system",
                                       "-o", "json").stdout)
    assert cronjob["spec"]["schedule"] == "15 1 * * *" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "billing", "close", "--kube"]
    # A run by hand, as an operator would start one; the apiserver admits the Job it makes.
    job = stack.kubectl("create", "job", "close-now", "--from=cronjob/dynabase-billing-close", "-n",
                        "dynabase-system", "--dry-run=server", "-o", "json")
    assert json.loads(job.stdout)["spec"]["template"]["spec"]["serviceAccountName"] == "dynabase-billing"
    for verb, resource, allowed in (("list", "tenantdatabases.dynabase.io", "yes"),
                                    ("get", "tierpolicies.dynabase.io", "yes"),
                                    ("patch", "tenantdatabases.dynabase.io", "no"),
                                    ("get", "secrets", "no")):
        answer = stack.kubectl("auth", "can-i", verb, resource, "--as", BILLING_SA, "-A", check=False).stdout
        assert answer.strip() == allowed, (verb, resource)

    # The month's tenants as the cluster has them: the tier history is in each object's status.
    namespace, policy = f"bill-{uuid.uuid4().hex[:6]}", f"billing-{uuid.uuid4().hex[:6]}"
    start = month_bounds("2002-09")[0]
    moved = Tenant("moved", "PRO", [(10, "STARTER", query_hours(20), 0), (300, "PRO", query_hours(100), 0)],
                   customer="cus_kube")
    month = month_of("2002-09", [moved])
    month.seed()
    stack.kubectl("create", "namespace", namespace)
    stack.kubectl("apply", "-f", "-", input=POLICY.replace("name: default", f"name: {policy}")
                  + f"---\napiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
                    f"metadata: {{name: moved, namespace: {namespace}}}\n"
                    f"spec: {{orgId: org-moved, tier: PRO, tierPolicyRef: {policy}}}\n")
    history = [{"from": "STARTER", "to": "PRO", "at": (start + dt.timedelta(days=10)).isoformat()}]
    stack.kubectl("patch", "tdb", "moved", "-n", namespace, "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"appliedTier": "PRO", "history": history}}))
    # The usage was metered under bill/moved; in the cluster the tenant is <namespace>/moved.
    client = redis.Redis.from_url(month.redis_url, decode_responses=True)
    first = month_hours("2002-09").start
    for offset, tier, seconds, queries in moved.hours:
        client.hset(usage_key(first + offset), usage_field(f"{namespace}/moved", "r1"),
                    encode({"queries": queries, "query_seconds": seconds, "connections": 1.0}, tier))
        client.hdel(usage_key(first + offset), usage_field(moved.key, "r1"))
    client.close()

    monkeypatch.setenv("KUBECONFIG", stack.env["KUBECONFIG"])
    monkeypatch.setenv("DYNABASE_STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("DYNABASE_REDIS_URL", month.redis_url)
    monkeypatch.delenv("DYNABASE_MONGO_URL", raising=False)
    try:
        code = main(["billing", "close", "--month", "2002-09", "--kube", "--namespace", namespace,
                     "--postgres-dsn", month.dsn, "--stripe-api-base", stripe.url, "--format", "json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert outcomes(json.loads(out.out)) == {f"{namespace}/moved": "sent"}
        # Prorated from the object's status: 240 of 720 hours on STARTER -> (20 - 25/3) over at $0.15.
        assert [(r.form["customer"], r.form["amount"]) for r in stripe.items()] == [
            ("cus_kube", str(round((20 - 25 * 240 / 720) * 0.15 * 100)))]
    finally:
        stack.kubectl("delete", "namespace", namespace, "--wait=false")
        stack.kubectl("delete", "tierpolicy", policy)


# -- headless mode, end to end --------------------------------------------------------------------


def test_headless_mode_closes_the_previous_month_after_its_first_pass(
        stack: Stack, month_of: Any, stripe: StripeRecorder, tmp_path: Path) -> None:
    from dynabase.desired.charges import previous_month

    now = dt.datetime.now(dt.UTC)
    last = previous_month(now)
    if now < month_bounds(last)[1] + dt.timedelta(hours=1, minutes=5):
        pytest.skip(f"{last} ended less than an hour ago: headless mode closes it from 01:00 UTC")
    suffix = uuid.uuid4().hex[:6]
    tenant = Tenant(f"hl-{suffix}", "STARTER", [(2, "STARTER", query_hours(27), 0)], customer="cus_headless")
    # Redis database 1: the engine's PgBouncer layout and this month's usage stay out of the devstack's own.
    month = month_of(last, [tenant], redis_db=1)
    month.seed()
    database = load_declared([str(month.manifests)])[1][0].database_name
    source = tmp_path / "gitops"
    source.mkdir()
    (source / "tenants.yaml").write_text(month.manifests.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
           "DYNABASE_POSTGRES_DSN": month.dsn, "DYNABASE_REDIS_URL": month.redis_url,
           "DYNABASE_SECRETS_STORE": "files", "DYNABASE_SECRETS_DIR": str(tmp_path / "secrets"),
           "DYNABASE_STRIPE_API_KEY": API_KEY, "DYNABASE_STRIPE_API_BASE": stripe.url, "HOME": str(tmp_path)}
    env.pop("DYNABASE_MONGO_URL", None)
    created = stripe.item_created
    headless = subprocess.Popen([sys.executable, "-m", "dynabase.cli", "headless", "--source", str(source),
                                 "--host", "127.0.0.1", "--port", str(free_port()), "--interval", "1h"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert created.wait(timeout=120), "headless mode sent nothing to Stripe"
        assert wait_closed(month) == last
    finally:
        headless.terminate()
        output, _ = headless.communicate(timeout=30)
        asyncio.run(drop_tenant(month.dsn, database))
    assert [(r.tenant, r.form["customer"], r.form["amount"]) for r in stripe.items()] == [
        (tenant.key, "cus_headless", "30")]  # (27 - 25) x $0.15
    assert API_KEY not in output


def wait_closed(month: Month) -> str:
    """The month as the ledger records it closed (the close marks it right after the last item)."""
    async def closed() -> str:
        ledger = await PostgresCloseLedger.open(month.dsn)
        try:
            while not await ledger.closed(month.name):
                await asyncio.sleep(0.05)
            return month.name
        finally:
            await ledger.close()
    return asyncio.run(asyncio.wait_for(closed(), 60))


async def drop_tenant(dsn: str, name: str) -> None:
    """What headless mode created for the tenant: its database and role."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")
    finally:
        await conn.close()
