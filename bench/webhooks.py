"""Stripe webhook to declared tier, against the real kube-apiserver.

    python -m bench.webhooks --deliveries 50

Signed `customer.subscription.updated` deliveries alternate one org between two prices;
each response comes after the TenantDatabase's `spec.tier` is patched, so the POST's
round trip is the time from Stripe's delivery to the tier declared. Prints p50/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from kubernetes import config

from bench.common import ROOT, devstack
from dynabase.billing.config import BillingConfig, WebhookSecret
from dynabase.billing.ledger import FileLedger
from dynabase.billing.processor import WebhookProcessor
from dynabase.billing.server import WEBHOOK_PATH, webhook_app
from dynabase.billing.sinks import KubeTierSink

SECRET = "whsec_" + uuid.uuid4().hex
PRICES = {"price_pro": "PRO", "price_team": "TEAM"}
NAMESPACE = "bench-webhooks"


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([env["DYNABASE_KUBECTL"], *args], env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
                         input=stdin, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


def delivery(org: str, price: str, created: int) -> tuple[bytes, dict[str, str]]:
    """A Stripe-shaped event and Stripe's signature header for it."""
    event: dict[str, Any] = {
        "id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "type": "customer.subscription.updated",
        "created": created, "livemode": False,
        "data": {"object": {"id": "sub_1", "object": "subscription", "status": "active", "customer": "cus_1",
                            "metadata": {"org_id": org},
                            "items": {"object": "list", "data": [
                                {"id": "si_1", "price": {"id": price, "product": "prod_1"}}]}}},
    }
    payload = json.dumps(event)
    now = int(time.time())
    digest = hmac.new(SECRET.encode(), f"{now}.{payload}".encode(), hashlib.sha256).hexdigest()
    return payload.encode(), {"Stripe-Signature": f"t={now},v1={digest}", "Content-Type": "application/json"}


async def measure(env: dict[str, str], deliveries: int) -> list[float]:
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    processor = WebhookProcessor(BillingConfig.model_validate({"prices": PRICES, "fallbackTier": "FREE"}),
                                 FileLedger(Path(tempfile.mkdtemp(prefix="dynabase-bench-")) / "events.json"),
                                 KubeTierSink(api, [NAMESPACE]))
    http: TestClient[Any, Any] = TestClient(TestServer(webhook_app(processor, WebhookSecret(SECRET)),
                                                       host="127.0.0.1"))
    await http.start_server()
    seconds: list[float] = []
    try:
        start = int(time.time())
        for i in range(deliveries):
            body, headers = delivery("org-bench", ("price_team", "price_pro")[i % 2], start + i)
            began = time.perf_counter()
            response = await http.post(WEBHOOK_PATH, data=body, headers=headers)
            outcome = (await response.json()).get("outcome")
            seconds.append(time.perf_counter() - began)
            if (response.status, outcome) != (200, "applied"):
                raise SystemExit(f"delivery {i}: {response.status} {outcome}")
    finally:
        await http.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=50)
    args = parser.parse_args()
    with devstack(["postgres", "redis", "etcd", "kube-apiserver"]) as env:
        kubectl(env, "apply", "-k", str(ROOT / "crds"))
        kubectl(env, "wait", "--for=condition=Established", "crd/tenantdatabases.dynabase.io", "--timeout=60s")
        kubectl(env, "create", "namespace", NAMESPACE)
        kubectl(env, "apply", "-f", "-", stdin=(
            "apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
            f"metadata: {{name: bench, namespace: {NAMESPACE}}}\nspec: {{orgId: org-bench, tier: FREE}}\n"))
        seconds = sorted(asyncio.run(measure(env, args.deliveries)))
        tier = json.loads(kubectl(env, "get", "tdb", "bench", "-n", NAMESPACE, "-o", "json"))["spec"]["tier"]
    p99 = seconds[max(0, int(len(seconds) * 0.99) - 1)]
    print(f"webhook -> tier patched over {len(seconds)} deliveries: p50 {statistics.median(seconds) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {seconds[-1] * 1000:.1f} ms (declared tier now {tier})")


if __name__ == "__main__":
    main()
