"""What one reconcile produced: per tenant (plans, outcomes, status, Events) and for the pass."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from dynabase.desired.effective import EffectiveLimits, ResolveError
from dynabase.desired.overage import OverageVerdict
from dynabase.desired.postgres import Password
from dynabase.desired.transition import TierDecision
from dynabase.spec import TenantDatabase, TenantDatabaseStatus

from .conditions import Outcome


@dataclass
class TenantResult:
    tenant: TenantDatabase
    decision: TierDecision | None = None
    error: ResolveError | None = None
    plans: dict[str, list[str]] = field(default_factory=dict)  # backend -> redacted lines
    outcomes: list[Outcome] = field(default_factory=list)
    status: TenantDatabaseStatus | None = None
    status_changed: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    password: Password | None = field(default=None, repr=False)
    cold: bool = False  # scaled to zero: idle past the tier's idleTimeout
    cold_at: dt.datetime | None = None  # when it goes Cold unless queried first (tiers with idleTimeout)
    activity_unknown: str | None = None  # why the proxies' activity could not be read (cold is then the last verdict)
    overage: OverageVerdict | None = None  # this month's usage against the included usage
    sessions_ended: int = 0

    @property
    def key(self) -> str:
        return self.tenant.key

    @property
    def limits_tier(self) -> str | None:
        return self.decision.applied_tier if self.decision else None

    @property
    def limits(self) -> EffectiveLimits | None:
        return self.decision.limits if self.decision else None

    @property
    def restriction(self) -> str | None:
        """What the month's usage restricts ("qps", "readOnly"), if anything."""
        return self.overage.restriction if self.overage is not None else None

    @property
    def ready(self) -> bool:
        return self.error is None and all(o.ok or o.advisory for o in self.outcomes)

    @property
    def changes(self) -> bool:
        return any(self.plans.values())


@dataclass
class PassResult:
    tenants: list[TenantResult]
    seconds: float
    writes: int

    @property
    def changes(self) -> bool:
        return any(t.changes for t in self.tenants)

    def render(self) -> str:
        lines: list[str] = []
        for result in sorted(self.tenants, key=lambda r: r.key):
            head = f"{result.key} (database {result.tenant.database_name})"
            if result.error is not None:
                lines.append(f"{head}: ERROR {result.error.reason}: {result.error.message}")
                continue
            decision = result.decision
            assert decision is not None
            tier = decision.applied_tier
            if decision.pending_tier:
                when = decision.effective_at.isoformat() if decision.effective_at else "?"
                tier += f" (downgrade to {decision.pending_tier} pending until {when})"
            if not result.changes:
                lines.append(f"{head}: tier {tier}: no changes")
                continue
            lines.append(f"{head}: tier {tier}:")
            for backend, backend_lines in result.plans.items():
                for line in backend_lines:
                    lines.append(f"  {backend}: {line}")
        return "\n".join(lines)
