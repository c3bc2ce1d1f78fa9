"""The operator (a real subprocess) keeps its tenants' events in Postgres beside the Kubernetes Events,
and sends their notifications signed with the secret from the tenant's Secret."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from dynabase.backends.events_pg import PostgresEventLog
from dynabase.backends.notify_pg import NotificationLedger

from .conftest import ROOT, Stack
from .test_operator import Operator, apply_tenant, kube_wait
from .webhook_receiver import receiving

pytestmark = [pytest.mark.kube, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def operator(stack: Stack, crds_applied: None) -> Iterator[Operator]:
    namespace = f"ev-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DYNABASE_NOTIFY_FIRST_RETRY", "100ms")  # the receiver refuses first attempts
        op = Operator(stack, namespace)
        op.start()
    try:
        yield op
    finally:
        op.stop()


async def test_the_operator_records_events_and_notifies_with_the_secret_from_the_tenants_secret(
        operator: Operator) -> None:
    stack, ns = operator.stack, operator.namespace
    secret = "whsec_" + uuid.uuid4().hex
    async with receiving(secret, fail_first=1) as receiver:
        encoded = base64.b64encode(secret.encode()).decode()
        stack.kubectl("apply", "-f", "-", input=(
            f"apiVersion: v1\nkind: Secret\nmetadata: {{name: hooks, namespace: {ns}}}\n"
            f"data: {{signing: {encoded}}}\n"))
        db = f"ev_{uuid.uuid4().hex[:6]}"
        apply_tenant(stack, ns, "hooked", f"orgId: org-hooked\ntier: FREE\ndatabaseName: {db}\n"
                                          f"notifications:\n  url: {receiver.url}\n"
                                          "  secretRef: {name: hooks, key: signing}\n")
        await asyncio.to_thread(kube_wait, stack, ns, "condition=Ready", "hooked")
        await receiver.until(lambda: receiver.types() == ["tier.applied"], "the operator's tier.applied")
    payload, = receiver.processed.values()
    assert payload["tenant"] == f"{ns}/hooked" and payload["orgId"] == "org-hooked" and payload["data"]["toTier"] == \
        "FREE"
    assert all(r.signature_ok for r in receiver.requests) and [r.answered for r in receiver.requests] == [500, 200]
    pool = await asyncpg.create_pool(stack.env["DYNABASE_POSTGRES_DSN"], min_size=1, max_size=1)
    try:
        history = await PostgresEventLog(pool).recent(tenant=f"{ns}/hooked")
        assert [(e.reason, e.id) for e in history if e.reason == "TierApplied"] == [("TierApplied", payload["id"])]
        delivery, = await NotificationLedger(pool).deliveries(tenant=f"{ns}/hooked")
        assert (delivery.status, delivery.attempts) == ("delivered", 2)
    finally:
        await pool.close()
    events = stack.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=hooked",
                           "-o", "jsonpath={.items[*].reason}").stdout
    assert "TierApplied" in events.split()  # the Kubernetes Event is still posted too
