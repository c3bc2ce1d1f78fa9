"""`dynabase webhooks`: Stripe-signed deliveries to the real aiohttp server change the
declared tier in the devstack's real kube-apiserver, or in a real git repository."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from dynabase.billing.config import BillingConfig, ConfigError, WebhookSecret, load_config, load_webhook_secret
from dynabase.billing.events import Ignored, TierChangeRequest, interpret
from dynabase.billing.ledger import EventLedger, FileLedger, PostgresLedger
from dynabase.billing.processor import WebhookProcessor
from dynabase.billing.server import WEBHOOK_PATH, webhook_app
from dynabase.billing.sinks import GitTierSink, KubeTierSink, TierSink
from dynabase.kubeapi import KubeApi
from dynabase.spec import TenantDatabase
from dynabase.spec.documents import load_paths

from .conftest import ROOT, Stack
from .manifests import tenant

SECRET = "whsec_" + uuid.uuid4().hex
CONFIG = BillingConfig.model_validate({
    "prices": {"price_pro_monthly": "PRO", "price_ent_yearly": {"tier": "ENTERPRISE", "tierPolicyRef": "enterprise"}},
    "products": {"prod_team": "TEAM"},
    "fallbackTier": "FREE",
})


# --- Stripe-shaped payloads, signed as Stripe signs them -------------------------------------------


def subscription_event(org_id: str, price: str = "price_pro_monthly", *, product: str = "prod_other",
                       kind: str = "updated", created: int | None = None, status: str = "active",
                       subscription: str = "sub_1", event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2024-06-20",
        "type": f"customer.subscription.{kind}",
        "created": created if created is not None else int(time.time()),
        "livemode": False,
        "data": {"object": {
            "id": subscription, "object": "subscription", "status": status, "customer": "cus_123",
            "metadata": {"org_id": org_id},
            "items": {"object": "list", "data": [
                {"id": "si_1", "object": "subscription_item",
                 "price": {"id": price, "object": "price", "product": product}},
            ]},
        }},
    }


def stripe_signature(payload: str, secret: str = SECRET, timestamp: int | None = None) -> str:
    """Stripe's scheme, computed here independently of the library that verifies it."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


class Receiver:
    """The webhook app on a real loopback port, posted to like Stripe does."""

    def __init__(self, http: TestClient[Any, Any]) -> None:
        self.http = http

    async def deliver(self, event: dict[str, Any], *, secret: str = SECRET, timestamp: int | None = None,
                      payload: str | None = None) -> tuple[int, dict[str, Any]]:
        body = payload if payload is not None else json.dumps(event)
        headers = {"Stripe-Signature": stripe_signature(json.dumps(event), secret, timestamp),
                   "Content-Type": "application/json"}
        response = await self.http.post(WEBHOOK_PATH, data=body.encode(), headers=headers)
        return response.status, await response.json()


async def start_receiver(ledger: EventLedger, sink: TierSink) -> Receiver:
    app = webhook_app(WebhookProcessor(CONFIG, ledger, sink), WebhookSecret(SECRET))
    http: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await http.start_server()
    return Receiver(http)


def events_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("dynabase_stripe_events_total", {"outcome": outcome}) or 0.0


# --- Pure parts --------------------------------------------------------------------------------------


def test_events_map_prices_products_and_endings() -> None:
    pro = interpret(subscription_event("org-a", "price_pro_monthly"), CONFIG)
    assert isinstance(pro, TierChangeRequest) and (pro.tier, pro.tier_policy_ref) == ("PRO", None)
    ent = interpret(subscription_event("org-a", "price_ent_yearly", product="prod_team"), CONFIG)
    assert isinstance(ent, TierChangeRequest) and (ent.tier, ent.tier_policy_ref) == ("ENTERPRISE", "enterprise")
    team = interpret(subscription_event("org-a", "price_unlisted", product="prod_team"), CONFIG)
    assert isinstance(team, TierChangeRequest) and team.tier == "TEAM"
    for ended in (subscription_event("org-a", kind="deleted", status="canceled"),
                  subscription_event("org-a", status="unpaid")):
        fallback = interpret(ended, CONFIG)
        assert isinstance(fallback, TierChangeRequest) and fallback.tier == "FREE" and fallback.ends_subscription
    incomplete = interpret(subscription_event("org-a", status="incomplete"), CONFIG)
    assert isinstance(incomplete, Ignored) and "incomplete" in incomplete.reason
    no_org = subscription_event("org-a")
    no_org["data"]["object"]["metadata"] = {}
    assert isinstance(interpret(no_org, CONFIG), Ignored)
    invoice = subscription_event("org-a")
    invoice["type"] = "invoice.paid"
    assert isinstance(interpret(invoice, CONFIG), Ignored)


def test_example_config_loads_and_secret_never_prints(tmp_path: Path) -> None:
    example = load_config(ROOT / "examples" / "billing" / "stripe-tiers.yaml")
    assert example.prices and example.fallback_tier.tier == "FREE"
    bad = tmp_path / "bad.yaml"
    bad.write_text("prices:\n  price_x: lowercase\n")
    with pytest.raises(ConfigError, match=r"prices\.price_x"):
        load_config(bad)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret = load_webhook_secret({"DYNABASE_STRIPE_WEBHOOK_SECRET_FILE": str(secret_file)})
    assert secret.reveal() == SECRET
    assert SECRET not in repr(secret) and SECRET not in f"{secret}"
    with pytest.raises(ConfigError):
        load_webhook_secret({})


# --- Kubernetes mode ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def namespace(stack: Stack, crds_applied: None) -> Iterator[str]:
    name = f"billing-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", name)
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
async def kube_api(stack: Stack) -> AsyncIterator[KubeApi]:
    stack.need("kube-apiserver")
    with pytest.MonkeyPatch.context() as patch:  # the adapter logs in from KUBECONFIG, as kopf does
        patch.setenv("KUBECONFIG", stack.env["KUBECONFIG"])
        async with KubeApi(connections=4) as api:
            yield api


@pytest.fixture
async def receiver(kube_api: KubeApi, namespace: str, tmp_path: Path) -> AsyncIterator[Receiver]:
    r = await start_receiver(FileLedger(tmp_path / "events.json"), KubeTierSink(kube_api, [namespace]))
    try:
        yield r
    finally:
        await r.http.close()


def new_tenant(stack: Stack, namespace: str, tier: str = "FREE") -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    name, org = f"t-{suffix}", f"org-{suffix}"
    stack.kubectl("apply", "-f", "-", input=tenant(name, f"orgId: {org}\ntier: {tier}\n", namespace))
    return name, org


def declared(stack: Stack, namespace: str, name: str) -> dict[str, Any]:
    out = stack.kubectl("get", "tdb", name, "-n", namespace, "-o", "json")
    return dict(json.loads(out.stdout)["spec"])


def patch_tier(stack: Stack, namespace: str, name: str, tier: str) -> None:
    stack.kubectl("patch", "tdb", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"tier": tier}}))


async def test_subscription_updates_patch_the_tier_and_are_timed(stack: Stack, namespace: str,
                                                                receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    status, body = await receiver.deliver(subscription_event(org, "price_pro_monthly"))
    assert (status, body["outcome"]) == (200, "applied"), body
    assert declared(stack, namespace, name)["tier"] == "PRO"
    generation = json.loads(stack.kubectl("get", "tdb", name, "-n", namespace, "-o", "json").stdout)["metadata"]
    # The same tier again (a new event) writes nothing: no new generation for the operator to reconcile.
    status, body = await receiver.deliver(subscription_event(org, "price_pro_monthly"))
    assert (status, body["outcome"]) == (200, "unchanged")
    again = json.loads(stack.kubectl("get", "tdb", name, "-n", namespace, "-o", "json").stdout)["metadata"]
    assert again["generation"] == generation["generation"]

    # Latency from POST to the tier declared in the apiserver (the response comes after the patch).
    seconds, start = [], int(time.time()) + 1
    for i in range(10):
        price = ("price_ent_yearly", "price_pro_monthly")[i % 2]
        began = time.perf_counter()
        status, body = await receiver.deliver(subscription_event(org, price, created=start + i))
        seconds.append(time.perf_counter() - began)
        assert (status, body["outcome"]) == (200, "applied"), body
    assert declared(stack, namespace, name)["tier"] == "PRO"  # the last of the ten
    print(f"webhook -> tier patched: p50 {statistics.median(seconds) * 1000:.1f} ms, "
          f"max {max(seconds) * 1000:.1f} ms over {len(seconds)}")


async def test_replayed_event_does_not_act_twice(stack: Stack, namespace: str, receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    event = subscription_event(org, "price_pro_monthly")
    assert (await receiver.deliver(event))[0] == 200
    assert declared(stack, namespace, name)["tier"] == "PRO"
    patch_tier(stack, namespace, name, "TEAM")  # an operator's manual change in between
    status, body = await receiver.deliver(event)  # Stripe's retry: same event, fresh signature
    assert (status, body["outcome"]) == (200, "duplicate")
    assert declared(stack, namespace, name)["tier"] == "TEAM"


async def test_bad_signatures_are_refused_and_change_nothing(stack: Stack, namespace: str,
                                                             receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    event = subscription_event(org, "price_pro_monthly")
    status, body = await receiver.deliver(event, secret="whsec_not_the_secret")
    assert (status, body) == (400, {"error": "invalid signature"})
    tampered = json.dumps(event).replace("price_pro_monthly", "price_ent_yearly")
    assert (await receiver.deliver(event, payload=tampered))[0] == 400
    unsigned = await receiver.http.post(WEBHOOK_PATH, data=json.dumps(event).encode())
    assert unsigned.status == 400
    assert declared(stack, namespace, name)["tier"] == "FREE"
    metrics = await (await receiver.http.get("/metrics")).text()
    assert SECRET not in metrics and 'outcome="bad_signature"' in metrics
    # Refused deliveries are not remembered: the genuine one still applies.
    status, body = await receiver.deliver(event)
    assert (status, body["outcome"]) == (200, "applied")


async def test_stale_signature_timestamp_is_refused(stack: Stack, namespace: str, receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    event = subscription_event(org, "price_pro_monthly")
    status, body = await receiver.deliver(event, timestamp=int(time.time()) - 301)
    assert (status, body) == (400, {"error": "stale timestamp"})
    assert declared(stack, namespace, name)["tier"] == "FREE"
    status, _ = await receiver.deliver(event, timestamp=int(time.time()) - 200)  # inside the tolerance
    assert status == 200 and declared(stack, namespace, name)["tier"] == "PRO"


async def test_unknown_price_is_acknowledged_and_ignored(stack: Stack, namespace: str, receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace, "PRO")
    before = events_counted("ignored")
    status, body = await receiver.deliver(subscription_event(org, "price_nobody_mapped"))
    assert (status, body["outcome"]) == (200, "ignored")
    assert "price_nobody_mapped" in body["detail"]
    assert events_counted("ignored") == before + 1
    assert declared(stack, namespace, name)["tier"] == "PRO"


async def test_deleted_subscription_falls_back_and_old_events_lose(stack: Stack, namespace: str,
                                                                   receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    t = int(time.time())
    assert (await receiver.deliver(subscription_event(org, "price_ent_yearly", created=t + 10)))[0] == 200
    spec = declared(stack, namespace, name)
    assert (spec["tier"], spec["tierPolicyRef"]) == ("ENTERPRISE", "enterprise")
    # Delivered late: created before the ENTERPRISE event already applied.
    status, body = await receiver.deliver(subscription_event(org, "price_pro_monthly", created=t))
    assert (status, body["outcome"]) == (200, "superseded")
    assert declared(stack, namespace, name)["tier"] == "ENTERPRISE"
    status, body = await receiver.deliver(
        subscription_event(org, "price_ent_yearly", kind="deleted", status="canceled", created=t + 20))
    assert (status, body["outcome"]) == (200, "applied")
    assert declared(stack, namespace, name)["tier"] == "FREE"


async def test_ending_an_earlier_subscription_does_not_downgrade(stack: Stack, namespace: str,
                                                                 receiver: Receiver) -> None:
    name, org = new_tenant(stack, namespace)
    t = int(time.time())
    await receiver.deliver(subscription_event(org, "price_pro_monthly", subscription="sub_old", created=t))
    await receiver.deliver(subscription_event(org, "price_unlisted", product="prod_team", kind="created",
                                              subscription="sub_new", created=t + 5))
    assert declared(stack, namespace, name)["tier"] == "TEAM"
    status, body = await receiver.deliver(
        subscription_event(org, "price_pro_monthly", kind="deleted", status="canceled", subscription="sub_old",
                           created=t + 10))
    assert (status, body["outcome"]) == (200, "ignored")
    assert declared(stack, namespace, name)["tier"] == "TEAM"


async def test_org_without_tenant_gets_404_until_it_exists(stack: Stack, namespace: str, receiver: Receiver) -> None:
    suffix = uuid.uuid4().hex[:8]
    org = f"org-{suffix}"
    event = subscription_event(org, "price_pro_monthly")
    status, body = await receiver.deliver(event)
    assert (status, body["outcome"]) == (404, "tenant_not_found")
    stack.kubectl("apply", "-f", "-", input=tenant(f"t-{suffix}", f"orgId: {org}\ntier: FREE\n", namespace))
    status, body = await receiver.deliver(event)  # Stripe's retry, once the tenant is provisioned
    assert (status, body["outcome"]) == (200, "applied")
    assert declared(stack, namespace, f"t-{suffix}")["tier"] == "PRO"


async def test_postgres_ledger_remembers_across_restarts(stack: Stack, namespace: str,
                                                         kube_api: KubeApi) -> None:
    name, org = new_tenant(stack, namespace)
    event = subscription_event(org, "price_pro_monthly")
    for restart in range(2):
        ledger = await PostgresLedger.open(stack.env["DYNABASE_POSTGRES_DSN"])
        receiver = await start_receiver(ledger, KubeTierSink(kube_api, [namespace]))
        try:
            status, body = await receiver.deliver(event)
        finally:
            await receiver.http.close()
            await ledger.close()
        if restart == 0:
            assert body["outcome"] == "applied" and declared(stack, namespace, name)["tier"] == "PRO"
            patch_tier(stack, namespace, name, "TEAM")
        else:
            assert (status, body["outcome"]) == (200, "duplicate")
    assert declared(stack, namespace, name)["tier"] == "TEAM"
    import psycopg

    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        row = conn.execute("SELECT outcome, applied, org_id FROM dynabase.stripe_events WHERE event_id = %s",
                           (event["id"],)).fetchone()
    assert row == ("applied", True, org)


# --- GitOps mode ----------------------------------------------------------------------------------------


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def gitops_remote(tmp_path: Path) -> Path:
    """A bare repository holding the example GitOps manifests on main."""
    seed, bare = tmp_path / "seed", tmp_path / "gitops.git"
    shutil.copytree(ROOT / "examples" / "gitops", seed)
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", ".", cwd=seed)
    git("commit", "-q", "-m", "seed", cwd=seed)
    git("clone", "-q", "--bare", str(seed), str(bare), cwd=tmp_path)
    return bare


def checkout(remote: Path, into: Path) -> Path:
    git("clone", "-q", "-b", "main", str(remote), str(into), cwd=remote.parent)
    return into


def tenant_tiers(folder: Path) -> dict[str, str]:
    result = load_paths([folder])
    assert not result.errors, result.errors
    return {d.resource.spec.org_id: d.resource.spec.tier for d in result.documents
            if isinstance(d.resource, TenantDatabase)}


async def test_git_mode_commits_only_the_tier_line(gitops_remote: Path, tmp_path: Path) -> None:
    sink = GitTierSink(str(gitops_remote), "main", "tenants", tmp_path / "cache")
    receiver = await start_receiver(FileLedger(tmp_path / "events.json"), sink)
    try:
        event = subscription_event("org-acme", "price_pro_monthly")
        status, body = await receiver.deliver(event)
        assert (status, body["outcome"]) == (200, "applied"), body
        head = git("log", "-1", "--format=%s%n%an", "main", cwd=gitops_remote)
        assert event["id"] in head and "dynabase-billing" in head
        numstat = git("diff", "--numstat", "main~1", "main", cwd=gitops_remote).split()
        assert numstat == ["1", "1", "tenants/acme.yaml"]
        diff = git("diff", "-U0", "main~1", "main", cwd=gitops_remote)
        assert [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")] == \
            ["-  tier: FREE", "+  tier: PRO"]
        assert tenant_tiers(checkout(gitops_remote, tmp_path / "after"))["org-acme"] == "PRO"

        commits = git("rev-list", "--count", "main", cwd=gitops_remote)
        assert (await receiver.deliver(event))[1]["outcome"] == "duplicate"
        assert (await receiver.deliver(subscription_event("org-acme", "price_pro_monthly")))[1]["outcome"] == \
            "unchanged"
        assert git("rev-list", "--count", "main", cwd=gitops_remote) == commits
    finally:
        await receiver.http.close()


async def test_git_mode_rebases_over_a_concurrent_push(gitops_remote: Path, tmp_path: Path) -> None:
    sink = GitTierSink(str(gitops_remote), "main", "", tmp_path / "cache")
    receiver = await start_receiver(FileLedger(tmp_path / "events.json"), sink)
    try:
        assert (await receiver.deliver(subscription_event("org-acme", "price_pro_monthly")))[0] == 200
        # A person pushes between our fetch and our push: a pre-push hook in the sink's clone does it, once.
        person = checkout(gitops_remote, tmp_path / "person")
        hook = sink.dir / ".git" / "hooks" / "pre-push"
        hook.write_text(
            "#!/bin/sh\n"
            f"[ -e {tmp_path}/raced ] && exit 0\ntouch {tmp_path}/raced\n"
            f"cd {person} && echo '# reviewed' >> tierpolicy.yaml && git -c user.name=p -c user.email=p@p "
            "commit -qam 'a person' && git push -q origin main\n"
        )
        hook.chmod(0o755)
        status, body = await receiver.deliver(subscription_event("org-globex", "price_ent_yearly"))
        assert (status, body["outcome"]) == (200, "applied"), body
        assert (tmp_path / "raced").exists()
        log = git("log", "--format=%s", "-3", "main", cwd=gitops_remote).splitlines()
        assert log[0].startswith("billing: org-globex tier -> ENTERPRISE") and log[1] == "a person"
        after = checkout(gitops_remote, tmp_path / "after")
        assert tenant_tiers(after) == {"org-acme": "PRO", "org-globex": "ENTERPRISE"}
        assert (after / "tierpolicy.yaml").read_text().endswith("# reviewed\n")
        assert "tierPolicyRef: enterprise" in (after / "tenants" / "globex.yaml").read_text()
    finally:
        await receiver.http.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_git_mode(gitops_remote: Path, tmp_path: Path) -> None:
    """The `dynabase webhooks` command itself: flags, secret file, ledger file, serving, clean stop."""
    config_file = tmp_path / "tiers.yaml"
    config_file.write_text("prices:\n  price_pro_monthly: PRO\n")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator"), "DYNABASE_STRIPE_WEBHOOK_SECRET_FILE": str(secret_file),
           "DYNABASE_CACHE_DIR": str(tmp_path / "cache"), "DYNABASE_LOG_LEVEL": "INFO"}
    env.pop("DYNABASE_POSTGRES_DSN", None)
    env.pop("DYNABASE_STRIPE_WEBHOOK_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "webhooks", "--config", str(config_file), "--listen",
         f"127.0.0.1:{port}", "--mode", "git", "--repo", str(gitops_remote), "--path", "tenants"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        payload = json.dumps(subscription_event("org-globex", "price_pro_monthly", kind="created"))
        response = httpx.post(f"{base}{WEBHOOK_PATH}", content=payload,
                              headers={"Stripe-Signature": stripe_signature(payload)})
        assert response.status_code == 200 and response.json()["outcome"] == "unchanged"  # globex is PRO already
        payload = json.dumps(subscription_event("org-acme", "price_pro_monthly", kind="created"))
        response = httpx.post(f"{base}{WEBHOOK_PATH}", content=payload,
                              headers={"Stripe-Signature": stripe_signature(payload)})
        assert response.status_code == 200 and response.json()["outcome"] == "applied"
        assert "org-acme tier -> PRO" in git("log", "-1", "--format=%s", "main", cwd=gitops_remote)
        assert (tmp_path / "cache" / "stripe-events.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert SECRET not in output and "webhooks listening" in output
