"""The API group's resources as whole manifests (apiVersion, kind, metadata, spec)."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from .policy_status import TierPolicyStatus
from .tenant import (
    IDENTIFIER_PATTERN,
    TenantDatabaseSpec,
    TenantDatabaseStatus,
    database_name_from,
    is_reserved,
    valid_identifier,
)
from .tier import TierPolicySpec

GROUP = "dynabase.io"
VERSION = "v1alpha1"
API_VERSION: Final = "dynabase.io/v1alpha1"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class Metadata(BaseModel):
    """The part of ObjectMeta the engine reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class TierPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_version: Literal["dynabase.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["TierPolicy"] = "TierPolicy"
    metadata: Metadata
    spec: TierPolicySpec
    status: TierPolicyStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class TenantDatabase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_version: Literal["dynabase.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["TenantDatabase"] = "TenantDatabase"
    metadata: Metadata
    spec: TenantDatabaseSpec
    status: TenantDatabaseStatus | None = None

    @model_validator(mode="after")
    def _database_name(self) -> Any:
        if self.spec.database_name is None:
            derived = database_name_from(self.metadata.name)
            if not valid_identifier(derived) or is_reserved(derived):
                raise PydanticCustomError(
                    "database_name",
                    "the name '{name}' does not make a valid database name ({pattern}, not "
                    "reserved); set spec.databaseName explicitly",
                    {"name": self.metadata.name, "pattern": IDENTIFIER_PATTERN},
                )
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def key(self) -> str:
        """Stable identity across sources: namespace/name."""
        return f"{self.namespace}/{self.metadata.name}"

    @property
    def database_name(self) -> str:
        return self.spec.database_name or database_name_from(self.metadata.name)


Resource = TierPolicy | TenantDatabase
KINDS: dict[str, type[TierPolicy] | type[TenantDatabase]] = {
    "TierPolicy": TierPolicy,
    "TenantDatabase": TenantDatabase,
}
