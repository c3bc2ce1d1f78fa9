"""The status of a declaration the engine cannot use (decided here, pure): a TierPolicy's status,
whether usable or not, and a TenantDatabase whose spec does not validate.

Two ways a declared policy cannot be used:

- its spec does not validate (stored before the CRD was tightened, or a manifest
  ``dynabase validate`` refuses): no tenant can use any of it;
- a tier, merged with the documented defaults for what it leaves out, breaks a
  rule over several limits (``pgbouncer.poolSize: 20`` with the default
  ``connectionLimit`` of 10): its tenants fail unless their overrides fix it.

The operator writes the result to the policy's status subresource; headless mode
shows it on ``/status``; ``dynabase validate`` and ``plan`` print it.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dynabase.spec import (
    Condition,
    PolicyProblem,
    TenantDatabase,
    TenantDatabaseStatus,
    TierPolicy,
    TierPolicyStatus,
)
from dynabase.spec.documents import Document, ManifestError
from dynabase.spec.policy_status import MAX_PROBLEMS, MAX_TENANT_NAMES

from .effective import ResolveError, broken_rules, effective_limits, merge_unchecked, rule_field

MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class PolicyUse:
    """A tenant that references the policy: its namespace/name and the tier it asks for."""

    key: str
    tier: str


def tier_problems(policy: TierPolicy, uses: Iterable[PolicyUse] = ()) -> list[PolicyProblem]:
    """The tiers that break a rule once the defaults fill what they leave out."""
    per_tier = Counter(use.tier for use in uses)
    problems = []
    for name, tier in sorted(policy.spec.tiers.items(), key=lambda item: item[1].rank):
        for rule, values in broken_rules(merge_unchecked(name, tier.rank, [tier])):
            problems.append(PolicyProblem(
                tier=name, field=f"spec.tiers.{name}.{rule_field(rule)}", tenants=per_tier[name],
                message=f"{rule.explain(values)}, with the defaults for what the tier leaves out; declare "
                "those in the tier (until then its tenants fail unless their overrides fix it)",
            ))
    return problems


def spec_problems(errors: Iterable[tuple[str, str]]) -> list[PolicyProblem]:
    """A spec that does not validate, as problems; ``errors`` are (field, message) pairs."""
    out = []
    for field, message in errors:
        parts = field.split(".")
        tier = parts[2] if len(parts) > 2 and parts[:2] == ["spec", "tiers"] else None
        out.append(PolicyProblem(tier=tier, field=field, message=message))
    return out


def describe(problems: Sequence[PolicyProblem], limit: int = 3) -> str:
    """The first problems in one line (the rest counted), for messages."""
    shown = "; ".join(f"{p.field}: {p.message}" for p in problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def usable_status(policy: TierPolicy, uses: Sequence[PolicyUse], previous: TierPolicyStatus | None,
                  now: dt.datetime) -> TierPolicyStatus:
    """The status of a policy whose spec validates: Ready unless a tier is unusable."""
    problems = tier_problems(policy, uses)
    if not problems:
        tiers = len(policy.spec.tiers)
        return _status(policy.metadata.generation, problems, uses, previous, now, ready=True, reason="Usable",
                       message=f"{tiers} tier(s) usable; {_tenants(len(uses))} use the policy")
    on_them = sum(p.tenants for p in problems)
    message = (f"{len({p.tier for p in problems})} tier(s) cannot be used as declared "
               f"({_tenants(on_them)} on them): {describe(problems)}")
    return _status(policy.metadata.generation, problems, uses, previous, now, ready=False,
                   reason="InvalidTier", message=message)


def unusable_status(generation: int | None, errors: Iterable[tuple[str, str]], uses: Sequence[PolicyUse],
                    previous: TierPolicyStatus | None, now: dt.datetime, *,
                    last_good: bool = False) -> TierPolicyStatus:
    """The status of a policy whose spec does not validate: nothing in it is used.
    ``last_good``: an earlier valid version of it stays in force (headless mode keeps one)."""
    problems = spec_problems(errors)
    kept = ("the last valid version of it stays in force" if last_good
            else "they keep the limits applied before")
    message = (f"the engine cannot use this policy: {describe(problems)}. {_tenants(len(uses))} reference it "
               f"and {kept}; fix the policy")
    return _status(generation, problems, uses, previous, now, ready=False, reason="InvalidSpec", message=message)


def invalid_tenant_status(generation: int | None, errors: Sequence[tuple[str, str]],
                          previous: TenantDatabaseStatus | None, now: dt.datetime) -> TenantDatabaseStatus:
    """A TenantDatabase whose spec does not validate (stored before the CRD was tightened): Degraded,
    Ready=False naming the fields; what was applied before stays recorded, and in force."""
    shown = "; ".join(f"{field}: {message}" for field, message in errors[:3])
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    message = f"the engine cannot use this declaration: {shown}{more}; the limits applied before stay until it is fixed"
    return TenantDatabaseStatus(
        observed_generation=generation, phase="Degraded",
        applied_tier=previous.applied_tier if previous else None,
        pending_tier=previous.pending_tier if previous else None,
        effective_at=previous.effective_at if previous else None,
        conditions=[_ready(False, "InvalidSpec", message, previous.condition("Ready") if previous else None,
                           generation, now)],
        history=list(previous.history) if previous else [],
        usage=previous.usage if previous else None,
    )


def _tenants(count: int) -> str:
    return f"{count} tenant{'' if count == 1 else 's'}"


def _status(generation: int | None, problems: list[PolicyProblem], uses: Sequence[PolicyUse],
            previous: TierPolicyStatus | None, now: dt.datetime, *, ready: bool, reason: str,
            message: str) -> TierPolicyStatus:
    condition = _ready(ready, reason, message, previous.condition("Ready") if previous else None, generation, now)
    return TierPolicyStatus(
        observed_generation=generation, conditions=[condition], tenants=len(uses),
        tenant_names=sorted(use.key for use in uses)[:MAX_TENANT_NAMES], problems=problems[:MAX_PROBLEMS],
    )


def _ready(ready: bool, reason: str, message: str, before: Condition | None, generation: int | None,
           now: dt.datetime) -> Condition:
    """The Ready condition; it keeps its lastTransitionTime while its status stays the same."""
    status = "True" if ready else "False"
    since = before.last_transition_time if before is not None and before.status == status else now
    return Condition(type="Ready", status=status, reason=reason, message=message[:MESSAGE_LIMIT],
                     last_transition_time=since, observed_generation=generation)


def policy_statuses(policies: Mapping[str, TierPolicy], invalid: Mapping[str, Sequence[tuple[str, str]]],
                    tenants: Iterable[TenantDatabase], previous: Mapping[str, TierPolicyStatus],
                    now: dt.datetime) -> dict[str, TierPolicyStatus]:
    """Every declared policy's status, for headless mode and the CLI.

    ``invalid`` holds the (field, message) errors of policies whose declaration does not
    validate; such a policy is reported unusable even when a last good version of it is
    still in ``policies``.
    """
    uses: dict[str, list[PolicyUse]] = {}
    for tenant in tenants:
        uses.setdefault(tenant.spec.tier_policy_ref, []).append(PolicyUse(tenant.key, tenant.spec.tier))
    out = {}
    for name in sorted({*policies, *invalid}):
        if name in invalid:
            generation = policies[name].metadata.generation if name in policies else None
            out[name] = unusable_status(generation, invalid[name], uses.get(name, []), previous.get(name), now,
                                        last_good=name in policies)
        else:
            out[name] = usable_status(policies[name], uses.get(name, []), previous.get(name), now)
    return out


def unusable_declarations(documents: Sequence[Document]) -> list[ManifestError]:
    """What ``dynabase validate`` adds to the schema's verdict: declarations that validate but that the
    engine cannot use together. A tier broken by the defaults it leaves to; a tenant whose tier, merged
    with its overrides, breaks a rule or is missing (judged only when its policy is among ``documents``)."""
    policies = {d.resource.name: (d, d.resource) for d in documents if isinstance(d.resource, TierPolicy)}
    tenants = [(d, d.resource) for d in documents if isinstance(d.resource, TenantDatabase)]
    errors = []
    for name, (doc, policy) in policies.items():
        uses = [PolicyUse(t.key, t.spec.tier) for _, t in tenants if t.spec.tier_policy_ref == name]
        errors += [ManifestError(doc.file, doc.line, "TierPolicy", name, p.field, p.message)
                   for p in tier_problems(policy, uses)]
    for doc, tenant in tenants:
        found = policies.get(tenant.spec.tier_policy_ref)
        if found is None:
            continue  # the policy may be declared elsewhere (the cluster, another folder)
        try:
            effective_limits(tenant, found[1], tenant.spec.tier)
        except ResolveError as exc:
            errors.append(ManifestError(doc.file, doc.line, "TenantDatabase", tenant.name, exc.field or "",
                                        exc.message))
    return errors
