"""Postgres as observed: the catalog rows the backend reads, as plain values, and the
parsers of the catalog's text forms. Pure; the plans in postgres.py compare against these.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ObservedRole:
    name: str
    login: bool
    connection_limit: int
    attributes: frozenset[str]  # which FORBIDDEN_ATTRIBUTES it has
    settings: dict[str, str]
    comment: str | None
    verifier: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ObservedDatabase:
    name: str
    owner: str
    allow_connections: bool
    connect_grantees: frozenset[str]  # roles with CONNECT; "" is PUBLIC


@dataclass
class PostgresObserved:
    roles: dict[str, ObservedRole] = field(default_factory=dict)
    databases: dict[str, ObservedDatabase] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    # Unclaimed warm pool databases by prefix; read only when a tenant's database is missing.
    warm_pool: dict[str, int] = field(default_factory=dict)


def connect_grantees(acl: list[str] | None, owner: str) -> frozenset[str]:
    """Who may CONNECT, from datacl text items such as ``=Tc/owner`` or ``app=c/owner``."""
    if acl is None:
        return frozenset({"", owner})  # NULL datacl is the default: PUBLIC and the owner
    out = set()
    for item in acl:
        grantee, _, rest = item.partition("=")
        if "c" in rest.split("/", 1)[0]:
            out.add(grantee.strip('"').replace('""', '"'))
    return frozenset(out)


def parse_setconfig(setconfig: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in setconfig or []:
        name, _, value = item.partition("=")
        out[name] = value
    return out
