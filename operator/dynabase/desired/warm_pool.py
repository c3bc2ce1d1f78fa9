"""The warm pool: tenant databases made ahead of sign-ups, handed over by renaming.

``CREATE DATABASE`` copies template1 and costs tens to hundreds of milliseconds;
``ALTER DATABASE … RENAME TO`` and an owner change cost well under one. So each
TierPolicy may keep ``warmPool.size`` databases ready, and a new tenant of that
policy claims one inside its normal plan (see ``desired.postgres``).

Everything about a pool database is in the catalog, nowhere else: its name
(``dynabase_pool_<policy tag>_<random>``; ``dynabase_*`` is reserved, so no
tenant is ever called that) and its owner, the NOLOGIN role ``dynabase_pool``.
It is closed until claimed: ``ALLOW_CONNECTIONS false`` and CONNECT revoked from
PUBLIC. A rename needs no connection to the database, so nobody ever connects.
Pure: names, sizes and the fill decision; the backend runs the SQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dynabase.spec import TierPolicy

from .sql import quote_ident

POOL_OWNER = "dynabase_pool"  # owns every unclaimed pool database; never logs in
POOL_PREFIX = "dynabase_pool_"
_TAG_LENGTH = 10  # hex digits of the policy's digest: names stay far below Postgres' 63 bytes


def policy_tag(policy: str) -> str:
    return hashlib.sha256(policy.encode()).hexdigest()[:_TAG_LENGTH]


def pool_prefix(policy: str) -> str:
    """Every pool database of ``policy`` starts with this (and no other policy's does)."""
    return f"{POOL_PREFIX}{policy_tag(policy)}_"


def pool_database_name(policy: str, token: str) -> str:
    return pool_prefix(policy) + token


def prefix_of(name: str) -> str:
    """The pool prefix (policy) a pool database name belongs to."""
    return name[:len(POOL_PREFIX) + _TAG_LENGTH + 1]


def count_by_prefix(names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        out[prefix_of(name)] = out.get(prefix_of(name), 0) + 1
    return out


def like_pattern(prefix: str) -> str:
    """``prefix`` as a LIKE pattern: ``_`` matches any character unless escaped."""
    return prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"


def pool_sizes(policies: Mapping[str, TierPolicy]) -> dict[str, int]:
    """How many ready databases each policy keeps (policies without ``warmPool`` keep none)."""
    return {name: (p.spec.warm_pool.size if p.spec.warm_pool else 0) for name, p in policies.items()}


@dataclass(frozen=True)
class FillPlan:
    create: dict[str, int]  # policy -> databases to add
    drop: tuple[str, ...]  # pool databases beyond their policy's size


def fill_plan(sizes: Mapping[str, int], existing: Iterable[str]) -> FillPlan:
    """What brings each known policy's pool to its size.

    Pool databases of policies not in ``sizes`` are left alone: a one-off
    ``dynabase apply`` that names one policy must not empty another's pool.
    """
    by_prefix: dict[str, list[str]] = {}
    for name in existing:
        by_prefix.setdefault(prefix_of(name), []).append(name)
    create: dict[str, int] = {}
    drop: list[str] = []
    for policy, size in sorted(sizes.items()):
        have = sorted(by_prefix.get(pool_prefix(policy), []))
        if len(have) < size:
            create[policy] = size - len(have)
        drop += have[size:]
    return FillPlan(create, tuple(drop))


def create_pool_database(name: str) -> tuple[str, str]:
    """Created closed and locked down, as a tenant's database is, but owned by the pool role.

    CREATE DATABASE cannot share a transaction, so the REVOKE follows it; the
    database accepts no connections in between. A claim revokes again anyway.
    """
    db = quote_ident(name)
    return (f"CREATE DATABASE {db} OWNER {quote_ident(POOL_OWNER)} ALLOW_CONNECTIONS false",
            f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC")


def drop_pool_database(name: str) -> str:
    return f"DROP DATABASE IF EXISTS {quote_ident(name)}"


def rename_sql(source: str, target: str) -> str:
    return f"ALTER DATABASE {quote_ident(source)} RENAME TO {quote_ident(target)}"
