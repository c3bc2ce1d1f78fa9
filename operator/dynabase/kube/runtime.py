"""The operator's shared state: the engine, batching of tenant events into passes, the drift
and wake-up loops, invalid declarations' status, and the pass's Events (through the API).

handlers.py wires kopf's events to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
from prometheus_client import Gauge
from pydantic import ValidationError

from dynabase.desired.declared_status import invalid_tenant_status
from dynabase.engine.reconciler import Engine, TenantResult, describe_error, utcnow
from dynabase.engine.runtime import EngineSettings, close_engine, start_engine
from dynabase.events.pipeline import event_pipeline
from dynabase.kubeapi import KubeApi
from dynabase.spec import GROUP, VERSION, TenantDatabase, TenantDatabaseStatus, TierPolicy
from dynabase.spec.documents import field_errors
from dynabase.spec.tenant import database_name_from

from .policy_status import PolicyCatalog, PolicyStatuses
from .settings import OperatorSettings
from .stores import KubeSecretStore, KubeStatusStore
from .webhooks import kube_endpoints

log = logging.getLogger(__name__)
DRIFT_ROUND = Gauge("dynabase_operator_drift_round", "The last drift round over this operator's tenants: "
                    "its wall time (seconds) and how many tenants it covered (tenants).", ["measure"])
for _measure in ("seconds", "tenants"):  # exported before the first round, as 0
    DRIFT_ROUND.labels(_measure)


class Runtime:
    """What the handlers share: the engine and the Kubernetes-backed stores."""

    def __init__(self, engine: Engine, api: KubeApi, statuses: KubeStatusStore, settings: OperatorSettings) -> None:
        self.engine = engine
        self.api = api
        self.statuses = statuses
        self.settings = settings
        self.catalog = PolicyCatalog()
        self.policy_statuses = PolicyStatuses(api, self.catalog)
        self._invalid: dict[str, tuple[Mapping[str, Any], list[tuple[str, str]]]] = {}  # tenants, by key
        self.deleted: set[str] = set()  # uids of tenants whose deletion handler has run
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
        # Events also go to Postgres (the portal, `dynabase events`), and from there to webhooks.
        self.events, self.notifier = event_pipeline(engine.postgres.pool, kube_endpoints(api))

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
        key = _key(body)
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
        return self.catalog.split(index)[0]

    def tenant(self, body: Mapping[str, Any]) -> TenantDatabase | None:
        """The tenant, or None when its spec does not validate (its status then says why)."""
        key = _key(body)
        try:
            tenant = TenantDatabase.model_validate(plain_body(body))
        except ValidationError as exc:
            self._invalid[key] = (body, field_errors(exc))
            return None
        self._invalid.pop(key, None)
        self.statuses.remember(tenant)
        return tenant

    async def _record_invalid(self, bodies: list[Mapping[str, Any]]) -> None:
        """Ready=False on the status of each tenant the engine cannot use, naming the fields, and a
        Warning Event when that starts (posted through the API: drift passes run outside kopf's handlers)."""
        for body in bodies:
            key = _key(body)
            if key not in self._invalid:
                continue
            async with self._locks[key]:  # one writer per tenant: the event is posted once
                await self._record_one_invalid(key, body, self._invalid[key][1])

    async def _record_one_invalid(self, key: str, body: Mapping[str, Any], errors: list[tuple[str, str]]) -> None:
        previous = self.statuses.known.get(key)  # what this operator wrote last, newer than the body's
        if previous is None:
            try:
                previous = TenantDatabaseStatus.model_validate(body.get("status") or {})
            except ValidationError:
                previous = None
        status = invalid_tenant_status(body.get("metadata", {}).get("generation"), errors, previous, utcnow())
        if status == previous:
            return
        await self.statuses.save(key, status)
        was = previous.condition("Ready") if previous is not None else None
        if was is None or was.reason != "InvalidSpec":
            meta = body["metadata"]
            namespace = meta.get("namespace", "default")
            await self.api.post_warning(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantDatabase", "name": meta["name"],
                 "namespace": namespace, "uid": str(meta.get("uid", ""))},
                namespace, "InvalidSpec", "; ".join(f"{f}: {m}" for f, m in errors), "dynabase-operator")

    def deleting(self, body: Mapping[str, Any]) -> bool:
        """Whether the deletion handler has this tenant (or had it: a pass queued with an older
        body must not make again what the deletion dropped)."""
        meta = body.get("metadata", {})
        return bool(meta.get("deletionTimestamp")) or (bool(meta.get("uid")) and str(meta["uid"]) in self.deleted)

    async def reconcile(self, bodies: list[Mapping[str, Any]], policy_index: Mapping[str, Any]) -> list[TenantResult]:
        bodies = [b for b in bodies if not self.deleting(b)]
        tenants = [t for t in (self.tenant(b) for b in bodies) if t is not None]
        await self._record_invalid(bodies)
        if not tenants:
            return []
        policies, unusable = self.catalog.split(policy_index)
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted({t.key for t in tenants}):  # sorted: no lock-order deadlocks
                await stack.enter_async_context(self._locks[key])
            # A deletion may have run while this pass waited for the locks.
            live = {_key(b) for b in bodies if not self.deleting(b)}
            tenants = [t for t in tenants if t.key in live]
            result = await self.engine.reconcile_all(policies, tenants, unusable_policies=unusable)
        await self._post_events(result.tenants, {_key(b): b for b in bodies})
        await self.events.record_quietly(result.tenants, utcnow())
        return result.tenants

    async def _post_events(self, results: list[TenantResult], bodies: Mapping[str, Mapping[str, Any]]) -> None:
        """The pass's Events, through the API: passes also run in the drift and wake-up tasks, where
        kopf.event cannot post. A refused post is logged; it never fails the pass (the Events are
        kept in Postgres too)."""
        posting = asyncio.Semaphore(8)

        async def post(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
            meta = body["metadata"]
            namespace = meta.get("namespace", "default")
            involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantDatabase", "name": meta["name"],
                        "namespace": namespace, "uid": str(meta.get("uid", ""))}
            async with posting:
                try:
                    await self.api.post_event(involved, namespace, type_, reason, message, "dynabase-operator")
                except Exception as exc:
                    log.warning("posting an Event failed", extra={"reason": reason, "error": describe_error(exc)})

        await asyncio.gather(*(post(bodies[r.key], *event) for r in results for event in r.events))


def _key(body: Mapping[str, Any]) -> str:
    return f"{body['metadata'].get('namespace', 'default')}/{body['metadata']['name']}"


def _database_of(body: Mapping[str, Any]) -> str:
    spec, meta = body.get("spec", {}), body.get("metadata", {})
    return str(spec.get("databaseName") or database_name_from(str(meta.get("name", ""))))


def plain_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A kopf body as plain data, without the fields the models do not declare."""
    raw = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    meta = dict(raw.get("metadata", {}))
    raw["metadata"] = {k: meta[k] for k in ("name", "namespace", "generation", "uid", "labels", "annotations",
                                            "resourceVersion") if k in meta}
    return raw
