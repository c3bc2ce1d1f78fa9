"""The platform's Redis keys and channels, and the JSON kept under them. Pure: no I/O.

The engine's backends, the proxy and the PgBouncer agent meet only in Redis, so the names
and shapes they agree on live here, each written once:

- proxy limits: the engine writes one hash field per tenant database (with its orgId and
  QPS scope) and announces the changed databases on a channel; every proxy replica keeps a copy;
- the PgBouncer layout: the engine publishes it (with a sequence number), agents report
  what they applied;
- usage: each proxy replica's cumulative counters per tenant and hour;
- activity and wake-ups of Cold tenants, proxy replicas' heartbeats, QPS leases (per budget:
  a database's or an organization's) and the backend keys CancelRequests are routed by.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from dynabase.desired.proxy import ProxyTenantLimits

# -- proxy limits ------------------------------------------------------------------------------

LIMITS_KEY = "dynabase:proxy:limits"  # hash: database -> encode_limits(...)
LIMITS_CHANNEL = "dynabase:proxy:limits:changed"  # message: the changed databases, comma-separated

_LIMITS_FIELDS = frozenset(f.name for f in fields(ProxyTenantLimits))
_LIMITS_REQUIRED = sorted(f.name for f in fields(ProxyTenantLimits) if f.default is MISSING)


def encode_limits(limits: ProxyTenantLimits) -> str:
    return json.dumps(asdict(limits), sort_keys=True, separators=(",", ":"))


def decode_limits(text: str) -> ProxyTenantLimits:
    """One hash field; ValueError says what is wrong with it. Fields unknown to this version
    are ignored, so an older proxy keeps working while a newer engine publishes."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"proxy limits are a JSON object, not {type(raw).__name__}")
    missing = [name for name in _LIMITS_REQUIRED if name not in raw]
    if missing:
        raise ValueError(f"proxy limits lack {', '.join(missing)}")
    return ProxyTenantLimits(**{k: v for k, v in raw.items() if k in _LIMITS_FIELDS})


def decode_limits_table(raw: Mapping[str, str]) -> tuple[dict[str, ProxyTenantLimits], dict[str, str]]:
    """Fields of the limits hash: the readable entries by database, and why each other one is not."""
    table: dict[str, ProxyTenantLimits] = {}
    unreadable: dict[str, str] = {}
    for database, text in raw.items():
        try:
            table[database] = decode_limits(text)
        except (TypeError, ValueError) as exc:
            unreadable[database] = str(exc)
    return table, unreadable


def changed_databases(message: str) -> list[str]:
    """A LIMITS_CHANNEL message: the databases whose entry was written or removed."""
    return [name for name in message.split(",") if name]


def encode_changed(databases: Iterable[str]) -> str:
    return ",".join(databases)


# -- activity and wake-ups of Cold tenants ------------------------------------------------------

ACTIVITY_KEY = "dynabase:proxy:activity"  # sorted set: database scored by the epoch of its last query
WAKE_CHANNEL = "dynabase:proxy:wake"  # message: the database a connection to a Cold tenant asked for

# -- proxy replicas -----------------------------------------------------------------------------

REPLICAS_KEY = "dynabase:proxy:replicas"  # sorted set: replica id scored by the epoch of its heartbeat
REPLICA_TTL = 5.0  # seconds without a heartbeat after which a replica no longer counts

# -- QPS leases: a hash of lane -> next free slot (the GCRA schedule in lanes; proxy/limiter.py) --


def lease_key(owner: str, lanes: int) -> str:
    """The schedule of one QPS budget; ``owner`` is a database or ``org:<orgId>``
    (desired.proxy.QpsBudget), so an organization's databases share one schedule."""
    return f"dynabase:qps:{owner}:lanes{lanes}"


# -- CancelRequests across replicas: a client's backend key -> the PgBouncer that issued it --------

CANCEL_TTL = 600  # seconds; rewritten while the connection lives, so a dead replica leaves nothing longer


def cancel_key(pid: int, key: int) -> str:
    return f"dynabase:proxy:cancel:{pid}:{key}"


def encode_cancel_target(target: tuple[str, int]) -> str:
    return f"{target[0]}:{target[1]}"


def decode_cancel_target(value: str) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


# -- usage: per hour, "<tenant>|<replica>" -> that replica's cumulative counters for the hour --------

USAGE_PATTERN = "dynabase:usage:*"
USAGE_TTL = 8 * 24 * 3600  # seconds: the engine copies the hours to MongoDB long before


def usage_key(hour: int) -> str:
    """``hour``: hours since the epoch."""
    return f"dynabase:usage:{hour}"


def usage_hour(key: str) -> int:
    """The hour of a key matching USAGE_PATTERN."""
    return int(key.rsplit(":", 1)[1])


def usage_field(tenant: str, replica: str) -> str:
    return f"{tenant}|{replica}"


def encode_usage(counters: Mapping[str, float], tier: str) -> str:
    return json.dumps({**counters, "tier": tier}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class UsageSample:
    """One replica's cumulative counters for one tenant and hour."""

    tenant: str
    replica: str
    tier: str | None
    counters: dict[str, float]


def decode_usage(fields: Mapping[str, str]) -> list[UsageSample]:
    """One hour's hash. Numbers are counters; other values (the tier) are not."""
    samples = []
    for name, text in fields.items():
        tenant, _, replica = name.rpartition("|")
        values = json.loads(text)
        tier = values.get("tier")
        counters = {k: v for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        samples.append(UsageSample(tenant, replica, str(tier) if tier is not None else None, counters))
    return samples


# -- the PgBouncer layout: published by the engine, applied and reported by the agents -------------

LAYOUT_KEY = "dynabase:pgbouncer:desired"  # string: PgBouncerDesired.to_json(version, seq)
LAYOUT_CHANNEL = "dynabase:pgbouncer:changed"  # message: the published layout's version
LAYOUT_SEQ_KEY = "dynabase:pgbouncer:seq"  # counter: publication sequence numbers
AGENTS_KEY = "dynabase:pgbouncer:agents"  # hash: agent id -> encode_agent_report(...)


@dataclass
class PoolReport:
    """One PgBouncer process as its agent found it after applying a layout."""

    port: int
    ok: bool
    mismatches: list[str] = field(default_factory=list)


@dataclass
class AgentReport:
    agent_id: str
    version: str  # of the layout applied
    at: float  # epoch of the report
    seq: int  # the highest publication applied
    pools: dict[str, PoolReport] = field(default_factory=dict)

    def pool_ok(self, pool: str) -> tuple[bool, str]:
        report = self.pools.get(pool)
        if report is None:
            return False, f"agent {self.agent_id} runs no pool {pool}"
        if not report.ok:
            return False, f"agent {self.agent_id} pool {pool}: " + "; ".join(report.mismatches)
        return True, ""

    def ports(self) -> dict[str, int]:
        return {name: pool.port for name, pool in self.pools.items()}


def encode_agent_report(report: AgentReport) -> str:
    return json.dumps({
        "version": report.version, "seq": report.seq, "at": report.at,
        "pools": {k: {"port": p.port, "ok": p.ok, "mismatches": p.mismatches} for k, p in report.pools.items()},
    })


def decode_agent_report(agent_id: str, text: str) -> AgentReport:
    raw: dict[str, Any] = json.loads(text)
    pools = {str(name): PoolReport(int(p["port"]), bool(p.get("ok")), [str(m) for m in p.get("mismatches", [])])
             for name, p in raw.get("pools", {}).items()}
    return AgentReport(agent_id, str(raw.get("version", "")), float(raw.get("at", 0)), int(raw.get("seq", 0)), pools)
