"""TierPolicy status: whether the engine can use the policy, and who uses it.

Written by the operator to the status subresource (and shown by headless mode on
``/status`` and by ``dynabase validate``/``plan``). A policy the engine cannot use
says so here, with the field and the fix, instead of only in a log.
"""

from __future__ import annotations

from pydantic import Field

from .base import Model
from .tenant import Condition

MAX_TENANT_NAMES = 20
MAX_PROBLEMS = 32


class PolicyProblem(Model):
    """One thing in the policy the engine cannot use."""

    tier: str | None = Field(None, description="The tier it is in; absent when the whole policy is unusable.")
    field: str = Field(..., description="Path of the field, e.g. spec.tiers.PRO.pgbouncer.poolSize.")
    message: str = Field(..., description="What is wrong and how to fix it.")
    tenants: int = Field(0, ge=0, description="Tenants on this tier (they get Ready=False unless their "
                         "overrides fix it).")


class TierPolicyStatus(Model):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    tenants: int = Field(0, ge=0, description="TenantDatabases that reference this policy (in the namespaces "
                         "the writing operator watches; with --shard, the first shard writes it and counts its own).")
    tenant_names: list[str] = Field(
        default_factory=list, max_length=MAX_TENANT_NAMES,
        description=f"The first {MAX_TENANT_NAMES} of them as namespace/name, sorted.",
    )
    problems: list[PolicyProblem] = Field(default_factory=list, max_length=MAX_PROBLEMS,
                                          description="What the engine cannot use, per tier.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    @property
    def ready(self) -> bool:
        ready = self.condition("Ready")
        return ready is not None and ready.status == "True"
