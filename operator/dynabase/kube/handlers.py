"""Thin kopf handlers: every decision is the engine's; this file only wires events to it.

- TenantDatabase create/update/resume reconcile that tenant; one drift loop (drift
  correction and due downgrades) reconciles all tenants every drift interval.
- A TierPolicy change reconciles the tenants that use it, found through a kopf index.
- A declaration the engine cannot use says so on its own status: a TierPolicy's
  status (policy_status.py) and an invalid TenantDatabase's Ready condition.
- Deletion holds a finalizer, honours deletionPolicy, and gives up after bounded
  retries with a Warning event instead of hanging forever.
- With ``--shard N/M`` the apiserver sends this operator only the tenants labelled
  for shard N (shards.py); a labeller labels the unlabelled ones that fall to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from dynabase.kubeapi import KubeApi, kopf_login
from dynabase.spec import GROUP, VERSION

from . import memory
from .labeller import Labeller
from .peering import ensure_peering, peering_priority
from .runtime import Runtime, plain_body
from .settings import OperatorSettings

log = logging.getLogger(__name__)
TENANTS, POLICIES = "tenantdatabases", "tierpolicies"


def _event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    # kopf only reads apiVersion/kind/metadata of the body to address the event.
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message)


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
        # Each watch stream holds a connection for good; the rest serve kopf's patches and events.
        watches = 2 * max(1, len(operator_settings.namespaces))
        return kopf_login(settings, connections=watches + operator_settings.api_connections)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
        # Only our own meaningful events, not one per handler run; our annotation prefix.
        settings.posting.level = logging.WARNING
        settings.persistence.finalizer = "dynabase.io/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="dynabase.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="dynabase.io", key="last-handled-configuration"
        )
        # Many parallel workers fill the micro-batches (500 tenants: 32 s at 1000 workers, 56 s
        # at 100, about the same RSS); engine passes are capped, so memory stays bounded.
        settings.batching.worker_limit = operator_settings.max_workers or None
        settings.peering.lifetime = operator_settings.peering_lifetime
        shard = operator_settings.shard
        if shard.sharded:  # filtered by the apiserver: other shards' tenants never reach this process
            settings.watching.label_selectors[GROUP, TENANTS] = shard.selector
        if operator_settings.metrics_port:
            start_http_server(operator_settings.metrics_port)
        memo.runtime = await Runtime.start(operator_settings, settings)
        if operator_settings.drift_interval > 0:  # 0 turns drift correction off (e.g. to measure without it)
            memo.drift = asyncio.create_task(memo.runtime.drift(kwargs["tenants_by_policy"], kwargs["policy_index"]))
        if shard.index == 0:  # one writer per policy: with shards, the first one (it counts its own tenants)
            memo.policy_statuses = asyncio.create_task(memo.runtime.policy_statuses.run(
                kwargs["policy_index"], kwargs["tenants_by_policy"], every=operator_settings.drift_interval))
        memo.wake_stop = asyncio.Event()
        memo.wakes = asyncio.create_task(
            memo.runtime.wakes(kwargs["tenants_by_policy"], kwargs["policy_index"], memo.wake_stop))
        memo.notify = asyncio.create_task(memo.runtime.notifier.run(memo.wake_stop))
        if shard.sharded:
            memo.labeller = asyncio.create_task(
                Labeller(memo.runtime.api, shard, operator_settings.namespaces).run(memo.wake_stop))
        if memory.enabled():
            memo.memory_log = asyncio.create_task(memory.log_periodically())

    operator_settings = settings

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if getattr(memo, "wake_stop", None) is not None:
            memo.wake_stop.set()
        for name in ("memory_log", "drift", "wakes", "notify", "policy_statuses", "labeller"):
            task = getattr(memo, name, None)
            if task is not None:
                task.cancel()
        runtime = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.close()

    @kopf.index(GROUP, VERSION, POLICIES, registry=registry, id="policy_index")
    async def policy_index(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {name: plain_body(body)}

    @kopf.index(GROUP, VERSION, TENANTS, registry=registry, id="tenants_by_policy")
    async def tenants_by_policy(spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {spec.get("tierPolicyRef", "default"): plain_body(body)}

    async def reconcile_one(body: kopf.Body, memo: kopf.Memo, policy_index: kopf.Index[str, Any]) -> None:
        memo.runtime.policy_statuses.schedule()  # the tenants using a policy may have changed
        result = await memo.runtime.submit(body, policy_index)
        if result is not None and not result.ready:
            failing = [o for o in result.outcomes if not o.ok]
            reason = result.error.message if result.error else "; ".join(o.message for o in failing)
            # Retried by kopf with backoff; the timer keeps trying after that.
            raise kopf.TemporaryError(f"not ready: {reason}", delay=3)

    @kopf.on.create(GROUP, VERSION, TENANTS, registry=registry, retries=6, backoff=5)
    @kopf.on.update(GROUP, VERSION, TENANTS, registry=registry, retries=6, backoff=5)
    @kopf.on.resume(GROUP, VERSION, TENANTS, registry=registry, retries=6, backoff=5)
    async def tenant_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await reconcile_one(body, memo, kwargs["policy_index"])

    @kopf.on.create(GROUP, VERSION, POLICIES, registry=registry)
    @kopf.on.update(GROUP, VERSION, POLICIES, registry=registry)
    async def policy_changed(name: str, memo: kopf.Memo, **kwargs: Any) -> None:
        memo.runtime.policy_statuses.schedule()
        await memo.runtime.engine.keep_warm(memo.runtime.policies(kwargs["policy_index"]))  # warmPool.size
        bodies = list(kwargs["tenants_by_policy"].get(name, []))
        if bodies:
            await memo.runtime.reconcile(bodies, kwargs["policy_index"])

    @kopf.on.resume(GROUP, VERSION, POLICIES, registry=registry)
    async def policy_resumed(memo: kopf.Memo, **_: Any) -> None:
        # A policy stored before the operator (re)started, maybe before the CRD was tightened.
        memo.runtime.policy_statuses.schedule()

    @kopf.on.delete(GROUP, VERSION, TENANTS, registry=registry, retries=settings.delete_retries, backoff=3)
    async def tenant_deleted(body: kopf.Body, memo: kopf.Memo, retry: int, **kwargs: Any) -> None:
        runtime: Runtime = memo.runtime
        runtime.policy_statuses.schedule()
        tenant = runtime.tenant(body)
        if tenant is None:
            return
        policies = runtime.policies(kwargs["policy_index"])
        if body.get("metadata", {}).get("uid"):
            runtime.deleted.add(str(body["metadata"]["uid"]))  # no queued pass makes it again
        async with runtime._locks[tenant.key]:
            result = await runtime.engine.reconcile_all(policies, [], deleted=[tenant])
        failing = [o for r in result.tenants for o in r.outcomes if not o.ok]
        runtime.statuses.forget(tenant.key)
        if not failing:
            _event(body, "Normal", "Deleted", f"deletionPolicy {tenant.spec.deletion_policy} carried out")
            return
        message = "; ".join(f"{o.condition_type}: {o.message}" for o in failing)
        if retry + 1 < settings.delete_retries:
            raise kopf.TemporaryError(f"deletion incomplete: {message}", delay=3 * (retry + 1))
        # Never hang forever on a backend that is gone: release the finalizer and say so.
        _event(body, "Warning", "DeletionIncomplete",
               f"gave up after {retry + 1} attempts, resources may remain: {message}")

    return registry


def run(settings: OperatorSettings) -> None:
    registry = build_registry(settings)
    peering = settings.shard.peering_name(settings.peering) if settings.peering else None
    if peering is not None:
        asyncio.run(_ensure_peering(peering, settings.namespaces))
    log.warning("operator starting", extra={"shard": str(settings.shard), "peering": peering})
    kopf.run(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=peering is None,
        peering_name=peering,
        priority=peering_priority(),
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
    )


async def _ensure_peering(name: str, namespaces: list[str]) -> None:
    async with KubeApi() as api:
        await ensure_peering(api, name, namespaces)
