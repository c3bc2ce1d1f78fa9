"""Thin kopf handlers: every decision is the engine's; this file only wires events to it.

- TenantDatabase create/update/resume reconcile that tenant; one drift loop (drift
  correction and due downgrades) reconciles all tenants every drift interval.
- A TierPolicy change reconciles the tenants that use it, found through a kopf index.
- Deletion holds a finalizer, honours deletionPolicy, and gives up after bounded
  retries with a Warning event instead of hanging forever.
- With ``--shard N/M`` the apiserver sends this operator only the tenants labelled
  for shard N (shards.py); a labeller labels the unlabelled ones that fall to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf
from prometheus_client import Gauge, start_http_server
from pydantic import ValidationError

from dynabase.engine.reconciler import Engine, TenantResult, describe_error
from dynabase.engine.runtime import EngineSettings, close_engine, start_engine
from dynabase.kubeapi import KubeApi, kopf_login
from dynabase.spec import GROUP, VERSION, TenantDatabase, TierPolicy
from dynabase.spec.tenant import database_name_from

from . import memory
from .labeller import Labeller
from .peering import ensure_peering, peering_priority
from .settings import OperatorSettings
from .stores import KubeSecretStore, KubeStatusStore

log = logging.getLogger(__name__)
TENANTS, POLICIES = "tenantdatabases", "tierpolicies"
DRIFT_ROUND = Gauge("dynabase_operator_drift_round", "The last drift round over this operator's tenants: "
                    "its wall time (seconds) and how many tenants it covered (tenants).", ["measure"])


class Runtime:
    """What the handlers share: the engine and the Kubernetes-backed stores."""

    def __init__(self, engine: Engine, api: KubeApi, statuses: KubeStatusStore, settings: OperatorSettings) -> None:
        self.engine = engine
        self.api = api
        self.statuses = statuses
        self.settings = settings
        self._policy_cache: dict[tuple[str, str], TierPolicy] = {}
        # kopf runs a tenant's timer beside its event handlers: one pass per tenant at a time.
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._queue: dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = {}
        self._waiters: dict[str, list[asyncio.Future[TenantResult | None]]] = collections.defaultdict(list)
        self._batch_task: asyncio.Task[None] | None = None
        # Events that arrive together (an apply of hundreds) share a pass; a lone sign-up waits only
        # this long, and what arrives while a pass runs queues for the next one anyway.
        self.batch_window = 0.005
        self.max_batch = self.drift_batch = 200
        self._wake_tasks: set[asyncio.Future[TenantResult | None]] = set()

    @classmethod
    async def start(cls, settings: OperatorSettings, kopf_settings: kopf.OperatorSettings) -> Runtime:
        api = KubeApi(kopf_settings)
        statuses = KubeStatusStore(api, field_manager=settings.shard.field_manager)
        engine = await start_engine(
            EngineSettings.from_env(concurrency=settings.concurrency),
            secrets=KubeSecretStore(api), status_store=statuses,
        )
        return cls(engine, api, statuses, settings)

    async def close(self) -> None:
        await close_engine(self.engine)
        await self.api.close()

    async def submit(self, body: Mapping[str, Any], policy_index: Mapping[str, Any]) -> TenantResult | None:
        """Reconcile one tenant as part of a micro-batch.

        Events for many tenants (a `kubectl apply` of hundreds, the drift timers)
        arrive together; one engine pass for all of them observes each backend once
        and publishes the PgBouncer layout once, instead of once per tenant.
        """
        future: asyncio.Future[TenantResult | None] = asyncio.get_running_loop().create_future()
        key = f"{body['metadata'].get('namespace', 'default')}/{body['metadata']['name']}"
        self._queue[key] = (body, policy_index)  # the newest body of a tenant wins
        self._waiters[key].append(future)
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._run_batch())
        return await future

    async def _run_batch(self) -> None:
        while self._queue:
            await asyncio.sleep(self.batch_window)
            # A bounded pass: one pass over everything queued at a 1,000-tenant apply left
            # pymalloc with ~25 MB of arenas it never returned; the rest waits for the next.
            batch = {key: self._queue.pop(key) for key in list(self._queue)[:self.max_batch]}
            waiters = {key: self._waiters.pop(key, []) for key in batch}
            try:
                results = await self.reconcile([body for body, _ in batch.values()],
                                               list(batch.values())[-1][1])
            except Exception as exc:  # every waiter learns of it; kopf retries
                for futures in waiters.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            by_key = {r.key: r for r in results}
            for key, futures in waiters.items():
                for future in futures:
                    if not future.done():
                        future.set_result(by_key.get(key))

    async def drift(self, tenants: Mapping[str, Iterable[Mapping[str, Any]]],
                    policy_index: Mapping[str, Any]) -> None:
        """Every drift interval, one level-based pass over all tenants, a batch at a time.

        It reverts manual changes and applies due downgrades. One task for all tenants,
        instead of a kopf timer per tenant, whose task, conditions and handler
        context cost memory for every tenant all the time. The kopf index is live:
        it holds each tenant's newest body.
        """
        while True:
            await asyncio.sleep(self.settings.drift_interval)
            started = time.monotonic()
            try:  # also after a restart, before any tenant's pass: the pools fill without a sign-up
                await self.engine.keep_warm(self.policies(policy_index))
            except Exception as exc:
                log.warning("warm pool not started", extra={"error": describe_error(exc)})
            bodies = [body for group in list(tenants.values()) for body in group
                      if not body.get("metadata", {}).get("deletionTimestamp")]
            for start in range(0, len(bodies), self.drift_batch):
                try:
                    await self.reconcile(bodies[start:start + self.drift_batch], policy_index)
                except Exception as exc:  # the next interval tries again, as kopf's timers did
                    log.warning("drift pass failed", extra={"error": describe_error(exc)})
            # A shard is sized right while this stays well under the drift interval (README, Sizing).
            DRIFT_ROUND.labels("seconds").set(time.monotonic() - started)
            DRIFT_ROUND.labels("tenants").set(len(bodies))

    async def wakes(self, tenants: Mapping[str, Iterable[Mapping[str, Any]]], policy_index: Mapping[str, Any],
                    stop: asyncio.Event) -> None:
        """A Cold tenant woken by a connection at a proxy is reconciled at once, so its status is
        Active again without waiting for the drift loop. Wake-ups are rare: a scan of the index is fine."""

        def on_wake(database: str) -> None:
            for group in list(tenants.values()):
                for body in group:
                    if _database_of(body) == database:
                        task = asyncio.ensure_future(self.submit(body, policy_index))
                        self._wake_tasks.add(task)
                        task.add_done_callback(self._wake_done)

        await self.engine.watch_wakes(on_wake, stop)

    def _wake_done(self, task: asyncio.Future[TenantResult | None]) -> None:
        self._wake_tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:  # the drift loop retries it
            log.warning("wake-up reconcile failed", extra={"error": describe_error(error)})

    def policies(self, index: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, TierPolicy]:
        out: dict[str, TierPolicy] = {}
        for name, bodies in index.items():
            for body in bodies:
                key = (name, str(body.get("metadata", {}).get("resourceVersion", "")))
                if key not in self._policy_cache:
                    try:
                        self._policy_cache[key] = TierPolicy.model_validate(_plain(body))
                    except ValidationError as exc:
                        log.warning("invalid TierPolicy ignored", extra={"policy": name, "error": str(exc)})
                        continue
                out[name] = self._policy_cache[key]
        return out

    def tenant(self, body: Mapping[str, Any]) -> TenantDatabase | None:
        try:
            tenant = TenantDatabase.model_validate(_plain(body))
        except ValidationError as exc:
            _event(body, "Warning", "InvalidSpec", str(exc)[:1000])
            return None
        self.statuses.remember(tenant)
        return tenant

    async def reconcile(self, bodies: list[Mapping[str, Any]], policy_index: Mapping[str, Any]) -> list[TenantResult]:
        tenants = [t for t in (self.tenant(b) for b in bodies) if t is not None]
        if not tenants:
            return []
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted({t.key for t in tenants}):  # sorted: no lock-order deadlocks
                await stack.enter_async_context(self._locks[key])
            result = await self.engine.reconcile_all(self.policies(policy_index), tenants)
        by_key = {f"{b['metadata'].get('namespace', 'default')}/{b['metadata']['name']}": b for b in bodies}
        for tenant_result in result.tenants:
            for type_, reason, message in tenant_result.events:
                _event(by_key[tenant_result.key], type_, reason, message)
        return result.tenants


def _event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    # kopf only reads apiVersion/kind/metadata of the body to address the event.
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message)


def _database_of(body: Mapping[str, Any]) -> str:
    spec, meta = body.get("spec", {}), body.get("metadata", {})
    return str(spec.get("databaseName") or database_name_from(str(meta.get("name", ""))))


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A kopf body as plain data, without the fields the models do not declare."""
    raw = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    meta = dict(raw.get("metadata", {}))
    raw["metadata"] = {k: meta[k] for k in ("name", "namespace", "generation", "uid", "labels", "annotations",
                                            "resourceVersion") if k in meta}
    return raw


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
        memo.wake_stop = asyncio.Event()
        memo.wakes = asyncio.create_task(
            memo.runtime.wakes(kwargs["tenants_by_policy"], kwargs["policy_index"], memo.wake_stop))
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
        for name in ("memory_log", "drift", "wakes", "labeller"):
            task = getattr(memo, name, None)
            if task is not None:
                task.cancel()
        runtime = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.close()

    @kopf.index(GROUP, VERSION, POLICIES, registry=registry, id="policy_index")
    async def policy_index(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {name: _plain(body)}

    @kopf.index(GROUP, VERSION, TENANTS, registry=registry, id="tenants_by_policy")
    async def tenants_by_policy(spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {spec.get("tierPolicyRef", "default"): _plain(body)}

    async def reconcile_one(body: kopf.Body, memo: kopf.Memo, policy_index: kopf.Index[str, Any]) -> None:
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
        await memo.runtime.engine.keep_warm(memo.runtime.policies(kwargs["policy_index"]))  # warmPool.size
        bodies = list(kwargs["tenants_by_policy"].get(name, []))
        if bodies:
            await memo.runtime.reconcile(bodies, kwargs["policy_index"])

    @kopf.on.delete(GROUP, VERSION, TENANTS, registry=registry, retries=settings.delete_retries, backoff=3)
    async def tenant_deleted(body: kopf.Body, memo: kopf.Memo, retry: int, **kwargs: Any) -> None:
        runtime: Runtime = memo.runtime
        tenant = runtime.tenant(body)
        if tenant is None:
            return
        policies = runtime.policies(kwargs["policy_index"])
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
