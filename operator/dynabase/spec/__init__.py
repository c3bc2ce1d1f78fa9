"""Declared models of the dynabase.io API: TierPolicy and TenantDatabase."""

from .policy_status import PolicyProblem, TierPolicyStatus
from .resources import API_VERSION, GROUP, KINDS, VERSION, Metadata, Resource, TenantDatabase, TierPolicy
from .tenant import (
    CONDITION_TYPES,
    Condition,
    SecretRef,
    TenantDatabaseSpec,
    TenantDatabaseStatus,
)
from .tier import SECTION_MODELS, Tier, TierLimits, TierPolicySpec
from .units import ByteSize, Duration

__all__ = [
    "API_VERSION", "CONDITION_TYPES", "GROUP", "KINDS", "SECTION_MODELS", "VERSION",
    "ByteSize", "Condition", "Duration", "Metadata", "PolicyProblem", "Resource",
    "SecretRef", "TenantDatabase", "TenantDatabaseSpec", "TenantDatabaseStatus", "Tier",
    "TierLimits", "TierPolicy", "TierPolicySpec", "TierPolicyStatus",
]
