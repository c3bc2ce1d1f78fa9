"""TierPolicies as the operator reads them, and their status subresource.

``PolicyCatalog`` turns the kopf index's bodies into the policies the engine can
use and, for the ones it cannot (a spec stored before the CRD was tightened),
the reason, which their tenants' Ready condition then names. ``PolicyStatuses``
writes each policy's status (Ready, its tier problems, the tenants using it) when
that changes: on policy events, after tenant events (the set of tenants using it
may have changed), and every drift interval. Writes are coalesced: many tenant
events in a burst cost one look at the indexes and a write per changed policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from dynabase.desired.declared_status import PolicyUse, describe, spec_problems, unusable_status, usable_status
from dynabase.engine.reconciler import describe_error, utcnow
from dynabase.kubeapi import KubeApi, KubeApiError
from dynabase.spec import GROUP, VERSION, TierPolicy, TierPolicyStatus
from dynabase.spec.documents import field_errors

log = logging.getLogger(__name__)
PLURAL = "tierpolicies"
Bodies = Mapping[str, Iterable[Mapping[str, Any]]]  # a kopf index: key -> the bodies under it


class PolicyCatalog:
    """Parsed policies, cached by resourceVersion (a policy is parsed once per change)."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str], TierPolicy | list[tuple[str, str]]] = {}

    def parse(self, name: str, body: Mapping[str, Any]) -> TierPolicy | list[tuple[str, str]]:
        """The policy, or the (field, message) errors that make it unusable."""
        key = (name, str(body.get("metadata", {}).get("resourceVersion", "")))
        if key not in self._parsed:
            stale = [k for k in self._parsed if k[0] == name]
            for old in stale:
                del self._parsed[old]
            try:
                self._parsed[key] = TierPolicy.model_validate(_declared(body))
            except ValidationError as exc:
                self._parsed[key] = field_errors(exc)
                log.warning("TierPolicy cannot be used; its status says why", extra={"policy": name})
        return self._parsed[key]

    def split(self, index: Bodies) -> tuple[dict[str, TierPolicy], dict[str, str]]:
        """Usable policies by name, and the unusable ones with why (for their tenants' status)."""
        usable: dict[str, TierPolicy] = {}
        unusable: dict[str, str] = {}
        for name, bodies in index.items():
            for body in bodies:
                parsed = self.parse(name, body)
                if isinstance(parsed, TierPolicy):
                    usable[name] = parsed
                else:
                    unusable[name] = describe(spec_problems(parsed))
        return usable, unusable


class PolicyStatuses:
    """Keeps every TierPolicy's status subresource up to date with the indexes."""

    def __init__(self, api: KubeApi, catalog: PolicyCatalog, *, window: float = 0.2,
                 clock: Any = utcnow) -> None:
        self.api, self.catalog = api, catalog
        self.window = window  # events within it share one recompute
        self.clock = clock
        self.written: dict[str, TierPolicyStatus] = {}
        self.writes = 0
        self._due = asyncio.Event()

    def schedule(self) -> None:
        """Something changed (a policy, or the tenants using one): recompute soon."""
        self._due.set()

    async def run(self, policies: Bodies, tenants: Bodies, every: float) -> None:
        """Recompute when scheduled, and at least every ``every`` seconds (a missed change heals)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), timeout=every if every > 0 else None)
            await asyncio.sleep(self.window)
            self._due.clear()
            try:
                await self.update(policies, tenants)
            except Exception as exc:  # the next change or interval retries
                log.warning("TierPolicy status update failed", extra={"error": describe_error(exc)})

    async def update(self, policies: Bodies, tenants: Bodies) -> int:
        """Write the status of each policy whose status changed; returns how many were written."""
        now = self.clock()
        changed = 0
        for name, bodies in list(policies.items()):
            for body in list(bodies):
                status = self.status_of(name, body, _uses(tenants.get(name, ())), now)
                if status == self.written.get(name, _recorded(body)):
                    continue
                await self._write(name, status)
                changed += 1
        return changed

    def status_of(self, name: str, body: Mapping[str, Any], uses: list[PolicyUse],
                  now: dt.datetime) -> TierPolicyStatus:
        previous = self.written.get(name) or _recorded(body)
        parsed = self.catalog.parse(name, body)
        if isinstance(parsed, TierPolicy):
            return usable_status(parsed, uses, previous, now)
        generation = body.get("metadata", {}).get("generation")
        return unusable_status(generation, parsed, uses, previous, now)

    async def _write(self, name: str, status: TierPolicyStatus) -> None:
        self.writes += 1
        try:
            await self.api.merge_patch(f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}/status", {"status": _patch(status)})
        except KubeApiError as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to record
                raise
        self.written[name] = status


def _uses(bodies: Iterable[Mapping[str, Any]]) -> list[PolicyUse]:
    """The tenants in an index entry, without those being deleted."""
    out = []
    for body in bodies:
        meta = body.get("metadata", {})
        if meta.get("deletionTimestamp"):
            continue
        out.append(PolicyUse(f"{meta.get('namespace', 'default')}/{meta.get('name', '')}",
                             str(body.get("spec", {}).get("tier", ""))))
    return out


def _recorded(body: Mapping[str, Any]) -> TierPolicyStatus | None:
    """The status the apiserver holds (None when absent or not ours to read)."""
    try:
        return TierPolicyStatus.model_validate(body["status"]) if body.get("status") else None
    except ValidationError:
        return None


def _declared(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the model validates: the declaration without the status the operator writes."""
    return {k: v for k, v in body.items() if k != "status"}


def _patch(status: TierPolicyStatus) -> dict[str, Any]:
    """A merge patch of the whole status: absent fields are sent as null, which removes them."""
    patch: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    for name, field in TierPolicyStatus.model_fields.items():
        patch.setdefault(field.alias or name, None)
    return patch
