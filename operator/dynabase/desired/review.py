"""The GitOps review: what a pull request changes, tenant by tenant. Pure.

Compares the declared state at a base ref with the working tree: tier moves
(upgrade, or downgrade after the grace period) and the resulting limit changes
per backend, rendered as Markdown for a PR comment.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynabase.spec import TenantDatabase, TierPolicy
from dynabase.spec.limit import LimitField
from dynabase.spec.limits import ALL_FIELDS

from .effective import EffectiveLimits, ResolveError, effective_limits, find_policy

# The limits a review shows: those declared with a review label, in declaration order.
FIELDS: tuple[LimitField, ...] = tuple(f for f in ALL_FIELDS if f.limit.review is not None)


def _read(limits: EffectiveLimits, declared: LimitField) -> str:
    return declared.show(declared.read(limits))


def _rows(before: EffectiveLimits | None, after: EffectiveLimits) -> list[tuple[str, str, str, str]]:
    """(backend, label, before, after) for each shown limit; all of them for a new tenant."""
    rows = [(f.section, str(f.limit.review), "-" if before is None else _read(before, f), _read(after, f))
            for f in FIELDS]
    return rows if before is None else [row for row in rows if row[2] != row[3]]


@dataclass
class TenantReview:
    key: str
    before: str | None  # tier, or None when new
    after: str | None  # tier, or None when removed
    kind: str  # "new" | "removed" | "upgrade" | "downgrade" | "lateral" | "limits" | "none" | "error"
    changes: list[tuple[str, str, str, str]]  # backend, field, before, after
    note: str = ""


def _limits(tenant: TenantDatabase, policies: dict[str, TierPolicy]) -> EffectiveLimits:
    return effective_limits(tenant, find_policy(tenant, policies), tenant.spec.tier)


def review(base: tuple[dict[str, TierPolicy], list[TenantDatabase]],
           head: tuple[dict[str, TierPolicy], list[TenantDatabase]]) -> list[TenantReview]:
    base_tenants = {t.key: t for t in base[1]}
    head_tenants = {t.key: t for t in head[1]}
    out: list[TenantReview] = []
    for key in sorted(set(base_tenants) | set(head_tenants)):
        old, new = base_tenants.get(key), head_tenants.get(key)
        if new is None:
            assert old is not None
            out.append(TenantReview(key, old.spec.tier, None, "removed", [],
                                    f"deletionPolicy {old.spec.deletion_policy}, after the confirmation window"))
            continue
        try:
            after = _limits(new, head[0])
        except ResolveError as exc:
            out.append(TenantReview(key, old.spec.tier if old else None, new.spec.tier, "error", [], exc.message))
            continue
        before = None
        if old is not None:
            try:
                before = _limits(old, base[0])
            except ResolveError:
                before = None
        if before is None:
            out.append(TenantReview(key, None, after.tier, "new", _rows(None, after)))
            continue
        changes = _rows(before, after)
        if before.tier != after.tier:
            kind = "upgrade" if after.rank > before.rank else "downgrade" if after.rank < before.rank else "lateral"
        else:
            kind = "limits" if changes else "none"
        note = ""
        if kind == "downgrade":
            note = f"applies after the {before.lifecycle.downgrade_grace_period} grace period"
        elif kind == "upgrade":
            note = "applies at once"
        out.append(TenantReview(key, before.tier, after.tier, kind, changes, note))
    return out


def markdown(reviews: list[TenantReview], base_ref: str) -> str:
    changed = [r for r in reviews if r.kind != "none"]
    lines = [f"### DynaBase plan against `{base_ref}`", ""]
    if not changed:
        return "\n".join([*lines, "No tenant changes."])
    lines += [f"{len(changed)} tenant(s) change.", ""]
    for r in changed:
        move = {"new": f"new, tier **{r.after}**", "removed": f"removed (was **{r.before}**)",
                "error": f"**invalid**: {r.note}"}.get(r.kind, f"**{r.before}** → **{r.after}** ({r.kind})")
        lines.append(f"#### `{r.key}`: {move}")
        if r.note and r.kind not in {"error"}:
            lines.append(f"_{r.note}_")
        if r.changes:
            lines += ["", "| backend | limit | before | after |", "|---|---|---|---|"]
            lines += [f"| {b} | {f} | {old} | {new} |" for b, f, old, new in r.changes]
        lines.append("")
    return "\n".join(lines)
