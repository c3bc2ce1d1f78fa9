"""TenantDatabase: one organisation's database, its tier, and what was applied."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import Field

from .base import Model, Rule
from .tier import TIER_NAME_PATTERN, TierLimits

IDENTIFIER_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
ORG_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$"
# Names the platform itself uses; a tenant owning one would take over the cluster.
RESERVED_NAMES = ("postgres", "template0", "template1", "dynabase", "pgbouncer")
RESERVED_PREFIXES = ("pg_", "dynabase_")

DeletionPolicy = Literal["Retain", "Delete"]
Phase = Literal["Pending", "Active", "Cold", "Suspended", "Degraded"]
ConditionStatus = Literal["True", "False", "Unknown"]

CONDITION_TYPES = (
    "PostgresReady",
    "PgBouncerReady",
    "RedisReady",
    "MongoReady",
    "RailwayReady",
    "ProxyReady",
    "Awake",
    "DirectAccess",  # advisory, True when a tenant role could log in to Postgres around the proxy
    "Ready",
)

_RESERVED_CEL = (
    "!(self in [" + ", ".join(f"'{n}'" for n in RESERVED_NAMES) + "])"
    + "".join(f" && !self.startsWith('{p}')" for p in RESERVED_PREFIXES)
)
RESERVED_MESSAGE = (
    "databaseName is reserved for the platform (postgres, template0/1, dynabase, pgbouncer, "
    "pg_*, dynabase_*); choose another name"
)


def is_reserved(name: str) -> bool:
    return name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES)


def database_name_from(resource_name: str) -> str:
    """Default databaseName: the resource name with '-' turned into '_'."""
    return resource_name.replace("-", "_").replace(".", "_")


class SecretRef(Model):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the tenant's namespace.")
    key: str = Field("password", min_length=1, max_length=253, description="Key holding the password.")


class RailwayTarget(Model):
    project_id: str = Field(..., min_length=1, max_length=64)
    environment_id: str = Field(..., min_length=1, max_length=64)
    service_name: str = Field(..., min_length=1, max_length=64)


# An http(s) URL without user:password@ (credentials in a URL end up in logs and ledgers).
WEBHOOK_URL_PATTERN = r"^https?://[^\s/?#@]+(/[^\s]*)?$"


class WebhookSecretRef(Model):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the tenant's namespace.")
    key: str = Field("secret", min_length=1, max_length=253, description="Key holding the signing secret.")


class Notifications(Model):
    """Where the organization's notifications go: usage at 80 % and 100 %, Cold soon, tier changes, restrictions."""

    url: str = Field(
        ..., max_length=2048, pattern=WEBHOOK_URL_PATTERN,
        description="Webhook URL the notifications are POSTed to (https outside tests; no user:password@).",
    )
    secret_ref: WebhookSecretRef | None = Field(
        None,
        description="The HMAC-SHA256 signing secret. Operator: this Secret in the tenant's namespace "
        "(default <name>-dynabase-webhook, key secret). Headless: the variable "
        "DYNABASE_WEBHOOK_SECRET_<NAMESPACE>__<NAME> (or ..._FILE).",
    )


class TenantDatabaseSpec(Model):
    org_id: str = Field(..., pattern=ORG_ID_PATTERN, description="The organisation this database belongs to.")
    tier: str = Field(..., pattern=TIER_NAME_PATTERN, description="Tier name in the referenced TierPolicy.")
    tier_policy_ref: str = Field(
        "default", min_length=1, max_length=253, description="Name of the TierPolicy. Default 'default'."
    )
    database_name: str | None = Field(
        None,
        pattern=IDENTIFIER_PATTERN,
        description="Postgres database and role name; defaults to the resource name with - as _. "
        "Immutable.",
    )
    password_secret_ref: SecretRef | None = Field(
        None, description="Secret with the tenant password; generated when absent."
    )
    overrides: TierLimits | None = Field(None, description="Any tier field, merged over the tier.")
    suspended: bool = Field(False, description="Refuse logins and end sessions, keep data.")
    deletion_policy: DeletionPolicy = Field(
        "Retain", description="Retain keeps data and disables login; Delete drops everything."
    )
    railway: RailwayTarget | None = Field(None, description="A dedicated Railway service, if any.")
    notifications: Notifications | None = Field(
        None, description="Signed webhooks for the organization (orgId); none when absent."
    )

    rules = (
        Rule(
            cel="!has(self.databaseName) || (" + _RESERVED_CEL.replace("self", "self.databaseName") + ")",
            message=RESERVED_MESSAGE,
            holds=lambda m: m.database_name is None or not is_reserved(m.database_name),
            field_path=".databaseName",
        ),
    )


class Condition(Model):
    type: str
    status: ConditionStatus
    reason: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class TierChange(Model):
    from_tier: str | None = Field(None, alias="from")
    to_tier: str = Field(..., alias="to")
    at: datetime
    drained_connections: int | None = Field(
        None, description="Postgres sessions over the new connection limit ended when this change applied."
    )


class UsageStatus(Model):
    """This month's usage against the tier's included vCPU-hours; changes only at thresholds."""

    month: str = Field(..., description="YYYY-MM (UTC).")
    level: Literal["80", "100"] | None = Field(None, description="Highest share of included usage reached.")
    over_since: datetime | None = Field(None, description="When the tenant first went over its included usage.")
    restriction: Literal["qps", "readOnly"] | None = Field(
        None, description="In force after the soft-overage period, until the next month or an upgrade."
    )


class TenantDatabaseStatus(Model):
    observed_generation: int | None = None
    phase: Phase = "Pending"
    applied_tier: str | None = None
    pending_tier: str | None = None
    effective_at: datetime | None = None
    conditions: list[Condition] = Field(default_factory=list)
    history: list[TierChange] = Field(default_factory=list, max_length=20, description="Recent tier changes.")
    usage: UsageStatus | None = Field(None, description="This month's usage against the included usage.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def valid_identifier(name: str) -> bool:
    return re.fullmatch(IDENTIFIER_PATTERN, name) is not None
