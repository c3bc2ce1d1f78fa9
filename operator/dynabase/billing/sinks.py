"""Where a tier change is declared: the TenantDatabase in Kubernetes, or its manifest in git."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dynabase.kubeapi import KubeApi, KubeApiError
from dynabase.spec import GROUP, VERSION
from dynabase.spec.documents import iter_manifest_files, parse_documents

from .events import TierChangeRequest
from .manifest_edit import EditError, set_tier

log = logging.getLogger(__name__)
PLURAL = "tenantdatabases"


class SinkOutcome(enum.Enum):
    CHANGED = "applied"
    UNCHANGED = "unchanged"  # already declared: a manual change or an earlier delivery got there first


@dataclass(frozen=True)
class SinkResult:
    outcome: SinkOutcome
    targets: tuple[str, ...]  # namespace/name of the TenantDatabases, or files in the repository


class TenantNotFound(LookupError):
    pass


class SinkError(RuntimeError):
    pass


class TierSink(Protocol):
    async def apply(self, request: TierChangeRequest) -> SinkResult: ...

    def describe(self) -> str: ...

    async def close(self) -> None: ...


def spec_patch(spec: Mapping[str, Any], request: TierChangeRequest) -> dict[str, str]:
    """Only the fields that differ: an unchanged spec gets no write (and no new generation)."""
    patch: dict[str, str] = {}
    if spec.get("tier") != request.tier:
        patch["tier"] = request.tier
    if request.tier_policy_ref is not None and spec.get("tierPolicyRef") != request.tier_policy_ref:
        patch["tierPolicyRef"] = request.tier_policy_ref
    return patch


class KubeTierSink:
    """Patches `spec.tier` of every TenantDatabase whose `spec.orgId` is the org's, in the watched namespaces."""

    def __init__(self, api: KubeApi, namespaces: Sequence[str] = ()) -> None:
        self.api = api
        self.namespaces = list(namespaces)  # empty = all namespaces

    def describe(self) -> str:
        return f"kubernetes ({', '.join(self.namespaces) or 'all namespaces'})"

    async def _tenants_of(self, org_id: str) -> list[dict[str, Any]]:
        # No field selector on spec.orgId without selectableFields; a list per event is cheap at webhook rates.
        items = await self.api.list_objects(GROUP, VERSION, PLURAL, self.namespaces)
        return [item for item in items if (item.get("spec") or {}).get("orgId") == org_id]

    async def _apply(self, request: TierChangeRequest) -> SinkResult:
        tenants = await self._tenants_of(request.org_id)
        if not tenants:
            raise TenantNotFound(f"no TenantDatabase with orgId {request.org_id} in {self.describe()}")
        changed, targets = False, []
        for tenant in tenants:
            namespace, name = tenant["metadata"]["namespace"], tenant["metadata"]["name"]
            targets.append(f"{namespace}/{name}")
            patch = spec_patch(tenant.get("spec") or {}, request)
            if not patch:
                continue
            await self.api.merge_patch(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
                                       {"spec": patch})
            changed = True
        return SinkResult(SinkOutcome.CHANGED if changed else SinkOutcome.UNCHANGED, tuple(targets))

    async def apply(self, request: TierChangeRequest) -> SinkResult:
        try:
            return await self._apply(request)
        except KubeApiError as exc:
            raise SinkError(f"kubernetes API: {exc.status} {exc.reason}") from exc

    async def close(self) -> None:
        await self.api.close()


@dataclass(frozen=True)
class GitIdentity:
    name: str = "dynabase-billing"
    email: str = "dynabase-billing@users.noreply.dynabase.io"


class GitTierSink:
    """Commits the tier change to the GitOps repository; headless mode (or Argo CD/Flux) applies it.

    A working clone lives in a cache directory and is reset to the remote branch
    before every change. When the push is refused because the branch moved, the
    change is made again on the new tip (a rebase of our one commit that cannot
    conflict) and pushed once more.
    """

    def __init__(self, url: str, branch: str, subdir: str, cache_dir: Path,
                 identity: GitIdentity | None = None) -> None:
        self.url, self.branch, self.subdir = url, branch, subdir
        self.dir = cache_dir / hashlib.sha256(f"{url}#{branch}".encode()).hexdigest()[:16]
        self.identity = identity or GitIdentity()
        self._lock = asyncio.Lock()  # one working clone: one change at a time

    def describe(self) -> str:
        # Never the URL: it may carry a token.
        return f"git branch {self.branch}" + (f" under {self.subdir}" if self.subdir else "")

    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        proc = subprocess.run(["git", *args], cwd=self.dir, env=env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise SinkError(f"git {args[0]} failed: {last}")
        return proc

    def _sync(self) -> None:
        if not (self.dir / ".git").exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            self._git("init", "-q")
            self._git("remote", "add", "origin", self.url)
        remote_ref = f"refs/remotes/origin/{self.branch}"
        self._git("fetch", "-q", "origin", f"+refs/heads/{self.branch}:{remote_ref}")
        self._git("checkout", "-q", "-B", self.branch, remote_ref)
        self._git("reset", "-q", "--hard", remote_ref)
        self._git("clean", "-q", "-fdx")

    def _edit(self, request: TierChangeRequest) -> tuple[list[Path], list[str]]:
        """Rewrite the org's manifests; returns (files changed, files declaring the org)."""
        root = self.dir / self.subdir if self.subdir else self.dir
        changed, declaring = [], []
        for path in iter_manifest_files([root]):
            text = path.read_text(encoding="utf-8")
            if request.org_id not in text:
                continue
            try:
                edit = set_tier(text, request.org_id, request.tier, request.tier_policy_ref)
            except EditError as exc:
                log.warning("manifest skipped", extra={"file": str(path.relative_to(self.dir)), "error": str(exc)})
                continue
            if not edit.documents:
                continue
            declaring.append(str(path.relative_to(self.dir)))
            if edit.text == text:
                continue
            # Never commit a manifest the change broke: it would stop headless mode for everyone.
            before = len(parse_documents(text, str(path)).errors)
            if len(parse_documents(edit.text, str(path)).errors) > before:
                raise SinkError(f"changing the tier would make {declaring[-1]} invalid")
            path.write_text(edit.text, encoding="utf-8")
            changed.append(path)
        return changed, declaring

    def _commit_message(self, request: TierChangeRequest) -> str:
        return (
            f"billing: {request.org_id} tier -> {request.tier} (Stripe event {request.event_id})\n\n"
            f"Stripe {request.event_type} for subscription {request.subscription_id or '?'}.\n"
            "Written by `dynabase webhooks`.\n"
        )

    def _apply(self, request: TierChangeRequest) -> SinkResult:
        for attempt in (1, 2):
            self._sync()
            changed, declaring = self._edit(request)
            if not declaring:
                raise TenantNotFound(f"no TenantDatabase with orgId {request.org_id} in {self.describe()}")
            if not changed:
                return SinkResult(SinkOutcome.UNCHANGED, tuple(declaring))
            self._git("add", "--", *(str(p.relative_to(self.dir)) for p in changed))
            self._git("-c", f"user.name={self.identity.name}", "-c", f"user.email={self.identity.email}",
                      "commit", "-q", "-m", self._commit_message(request))
            pushed = self._git("push", "-q", "origin", f"HEAD:refs/heads/{self.branch}", check=False)
            if pushed.returncode == 0:
                return SinkResult(SinkOutcome.CHANGED, tuple(declaring))
            log.info("push refused, retrying on the new branch tip", extra={"attempt": attempt})
        raise SinkError(f"git push to {self.branch} refused twice (the branch keeps moving, or it is protected)")

    async def apply(self, request: TierChangeRequest) -> SinkResult:
        async with self._lock:
            return await asyncio.to_thread(self._apply, request)

    async def close(self) -> None:
        """The working clone stays in the cache for the next start."""
