"""What a notification is on the wire: its JSON body and its signature. Pure.

The signature header works like Stripe's: ``DynaBase-Signature: t=<unix seconds>,v1=<hex>``
where ``v1`` is HMAC-SHA256 with the endpoint's secret over ``"<t>." + body``. A
receiver recomputes it over the raw body, compares in constant time, refuses a ``t``
older than a few minutes (a replay), and keeps the ids it has processed
(``DynaBase-Event-Id``, also the body's ``id``): a notification may arrive more than once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from dynabase.backends.events_pg import StoredEvent

SIGNATURE_HEADER = "DynaBase-Signature"
EVENT_ID_HEADER = "DynaBase-Event-Id"
ATTEMPT_HEADER = "DynaBase-Delivery-Attempt"
TOLERANCE_SECONDS = 300

# The events that are notified, by engine reason, with the type a receiver switches on.
NOTIFIED: Mapping[str, str] = {
    "UsageWarning": "usage.warning",  # 80 % of the month's included usage
    "IncludedUsageExceeded": "usage.exceeded",  # 100 %
    "ColdSoon": "tenant.cold_soon",  # lifecycle.coldWarning before idleTimeout
    "TierApplied": "tier.applied",
    "DowngradeScheduled": "tier.downgrade_scheduled",
    "UsageRestricted": "usage.restricted",
    "UsageRestrictionLifted": "usage.restriction_lifted",
}


class SignatureError(ValueError):
    """Why a signature header does not vouch for a body."""


def payload(event: StoredEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": NOTIFIED[event.reason],
        "created": event.at.isoformat().replace("+00:00", "Z"),
        "tenant": event.tenant,
        "orgId": event.org_id,
        "database": event.database,
        "tier": event.tier,
        "reason": event.reason,
        "severity": event.type,
        "message": event.message,
        "data": dict(event.data),
    }


def body(event: StoredEvent) -> str:
    return json.dumps(payload(event), sort_keys=True, separators=(",", ":"))


def _mac(secret: str, timestamp: int, raw: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()


def sign(secret: str, raw: bytes, timestamp: int) -> str:
    """The ``DynaBase-Signature`` value for ``raw`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, raw)}"


def verify(header: str, raw: bytes, secrets: str | Sequence[str], *, now: float,
           tolerance: float = TOLERANCE_SECONDS) -> int:
    """The header's timestamp when one of its ``v1`` values matches a secret (several while rotating)."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError("no t=<unix seconds> in the signature header") from None
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"timestamp {timestamp} is more than {tolerance:g} s from now: a replay or a stale retry")
    candidates = parts.get("v1", [])
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not any(hmac.compare_digest(_mac(key, timestamp, raw), given) for key in keys for given in candidates):
        raise SignatureError("no v1 signature matches the body")
    return timestamp
