"""Pure interpretation of a Stripe event: which org moves to which tier, or why nothing happens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import SUBSCRIPTION_DELETED, BillingConfig, TierTarget, valid_org_id


@dataclass(frozen=True)
class TierChangeRequest:
    org_id: str
    tier: str
    tier_policy_ref: str | None
    event_id: str
    event_type: str
    created: int  # the event's creation time, Unix seconds: orders events per org
    subscription_id: str
    ends_subscription: bool  # the fallback tier because this subscription is over
    customer_id: str | None = None  # the Stripe customer paying for the org: the billing close invoices it


@dataclass(frozen=True)
class Ignored:
    event_id: str
    reason: str
    org_id: str | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _object_id(value: Any) -> str | None:
    """Stripe references are an id string, or the object itself when expanded."""
    if isinstance(value, str):
        return value
    found = _mapping(value).get("id")
    return found if isinstance(found, str) else None


def _org_id(subscription: Mapping[str, Any], key: str) -> str | None:
    # The subscription's own metadata first; an expanded customer's metadata second.
    for holder in (subscription, _mapping(subscription.get("customer"))):
        value = _mapping(holder.get("metadata")).get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _subscribed_target(subscription: Mapping[str, Any], config: BillingConfig) -> TierTarget | str:
    """The one tier the subscription's items map to, or why there is none."""
    targets: set[TierTarget] = set()
    seen_prices: list[str] = []
    for item in _mapping(subscription.get("items")).get("data") or []:
        price = _mapping(_mapping(item).get("price"))
        price_id = _object_id(price) if price else None
        target = config.target_for(price_id, _object_id(price.get("product")))
        if price_id:
            seen_prices.append(price_id)
        if target is not None:
            targets.add(target)
    if not targets:
        return f"no configured price or product among {seen_prices or 'no items'}"
    if len(targets) > 1:
        return f"items map to several tiers ({', '.join(sorted(t.tier for t in targets))})"
    return next(iter(targets))


def interpret(event: Mapping[str, Any], config: BillingConfig) -> TierChangeRequest | Ignored:
    event_id = str(event.get("id") or "")
    event_type = str(event.get("type") or "")
    created = event.get("created")
    if not event_id or not isinstance(created, int):
        return Ignored(event_id, "not a Stripe event (no id or created)")
    if event_type not in config.events:
        return Ignored(event_id, f"event type {event_type!r} not handled")
    subscription = _mapping(_mapping(event.get("data")).get("object"))
    if subscription.get("object") != "subscription":
        return Ignored(event_id, "event data is not a subscription")
    org_id = _org_id(subscription, config.org_id_metadata_key)
    if org_id is None:
        return Ignored(event_id, f"subscription has no metadata.{config.org_id_metadata_key}")
    if not valid_org_id(org_id):
        return Ignored(event_id, "metadata org id is not a valid orgId")
    status = str(subscription.get("status") or "")
    ends = event_type == SUBSCRIPTION_DELETED or status in config.ended_statuses
    if ends:
        target: TierTarget | str = config.fallback_tier
    elif status in config.active_statuses:
        target = _subscribed_target(subscription, config)
    else:
        return Ignored(event_id, f"subscription status {status!r} changes nothing", org_id)
    if isinstance(target, str):
        return Ignored(event_id, target, org_id)
    return TierChangeRequest(
        org_id=org_id, tier=target.tier, tier_policy_ref=target.tier_policy_ref, event_id=event_id,
        event_type=event_type, created=created, subscription_id=str(subscription.get("id") or ""),
        ends_subscription=ends, customer_id=_object_id(subscription.get("customer")),
    )
