"""The billing mapping: which Stripe prices and products mean which tier.

Example (examples/billing/stripe-tiers.yaml):

    prices:
      price_pro_monthly: PRO
      price_ent_yearly: {tier: ENTERPRISE, tierPolicyRef: enterprise}
    products:
      prod_team: TEAM
    fallbackTier: FREE
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from dynabase.settings import SettingsError, secret_from_env
from dynabase.spec.tenant import ORG_ID_PATTERN
from dynabase.spec.tier import TIER_NAME_PATTERN

SUBSCRIPTION_CREATED = "customer.subscription.created"
SUBSCRIPTION_UPDATED = "customer.subscription.updated"
SUBSCRIPTION_DELETED = "customer.subscription.deleted"
SUBSCRIPTION_EVENTS = (SUBSCRIPTION_CREATED, SUBSCRIPTION_UPDATED, SUBSCRIPTION_DELETED)


class ConfigError(ValueError):
    pass


class _ConfigModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TierTarget(_ConfigModel):
    """Where a price or product puts the organisation."""

    tier: str = Field(..., pattern=TIER_NAME_PATTERN)
    tier_policy_ref: str | None = Field(None, min_length=1, max_length=253)


def _targets(value: Any) -> Any:
    # `price_x: PRO` is shorthand for `price_x: {tier: PRO}`.
    if isinstance(value, dict):
        return {key: {"tier": target} if isinstance(target, str) else target for key, target in value.items()}
    return value


class BillingConfig(_ConfigModel):
    prices: dict[str, TierTarget] = Field(default_factory=dict, description="Stripe price id -> tier.")
    products: dict[str, TierTarget] = Field(
        default_factory=dict, description="Stripe product id -> tier, when no price of the item is listed."
    )
    org_id_metadata_key: str = Field("org_id", min_length=1, description="Metadata key naming the org.")
    events: tuple[str, ...] = Field(SUBSCRIPTION_EVENTS, description="Event types acted on; others are ignored.")
    fallback_tier: TierTarget = Field(
        TierTarget(tier="FREE"), description="Tier of an org whose subscription ended (deleted, canceled, unpaid)."
    )
    active_statuses: tuple[str, ...] = ("active", "trialing", "past_due")
    # A subscription in one of these is over: the org falls back. Other statuses
    # (incomplete: first payment pending) change nothing yet.
    ended_statuses: tuple[str, ...] = ("canceled", "unpaid", "incomplete_expired", "paused")

    @field_validator("prices", "products", mode="before")
    @classmethod
    def _target_shorthands(cls, value: Any) -> Any:
        return _targets(value)

    @field_validator("fallback_tier", mode="before")
    @classmethod
    def _fallback_shorthand(cls, value: Any) -> Any:
        return {"tier": value} if isinstance(value, str) else value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(SUBSCRIPTION_EVENTS))
        if unknown:
            raise ValueError(f"unsupported event types {unknown}; supported: {', '.join(SUBSCRIPTION_EVENTS)}")
        return value

    def target_for(self, price_id: str | None, product_id: str | None) -> TierTarget | None:
        """A price mapping wins over its product's: one product may have prices for several tiers."""
        if price_id is not None and price_id in self.prices:
            return self.prices[price_id]
        if product_id is not None and product_id in self.products:
            return self.products[product_id]
        return None


def valid_org_id(value: str) -> bool:
    return re.fullmatch(ORG_ID_PATTERN, value) is not None


def load_config(path: Path) -> BillingConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        config = BillingConfig.model_validate(raw or {})
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {details}") from exc
    if not config.prices and not config.products:
        raise ConfigError(f"{path}: map at least one Stripe price or product to a tier")
    return config


SECRET_ENV = "DYNABASE_STRIPE_WEBHOOK_SECRET"
API_KEY_ENV = "DYNABASE_STRIPE_API_KEY"


class _Redacted:
    """A Stripe secret; its repr is redacted so it cannot reach a log line by accident."""

    __slots__ = ("_value",)
    what = "secret"

    def __init__(self, value: str) -> None:
        if not value.strip():
            raise ConfigError(f"the {self.what} is empty")
        self._value = value.strip()

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    __str__ = __repr__


class WebhookSecret(_Redacted):
    """The endpoint's signing secret (whsec_...)."""

    __slots__ = ()
    what = "Stripe webhook secret"


class StripeApiKey(_Redacted):
    """A secret (sk_...) or restricted (rk_...) key allowed to write invoice items."""

    __slots__ = ()
    what = "Stripe API key"


def _secret(name: str, environ: Mapping[str, str]) -> str | None:
    try:
        return secret_from_env(name, environ)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None


def load_webhook_secret(environ: Mapping[str, str]) -> WebhookSecret:
    """From $DYNABASE_STRIPE_WEBHOOK_SECRET, or the file named by $DYNABASE_STRIPE_WEBHOOK_SECRET_FILE."""
    value = _secret(SECRET_ENV, environ)
    if value is None:
        raise ConfigError(f"set {SECRET_ENV} (or {SECRET_ENV}_FILE) to the endpoint's signing secret (whsec_...)")
    return WebhookSecret(value)


def load_api_key(environ: Mapping[str, str]) -> StripeApiKey | None:
    """From $DYNABASE_STRIPE_API_KEY, or the file named by $DYNABASE_STRIPE_API_KEY_FILE; None when unset."""
    value = _secret(API_KEY_ENV, environ)
    return StripeApiKey(value) if value is not None else None
