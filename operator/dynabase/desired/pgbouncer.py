"""PgBouncer: the desired pool layout and its rendering. Pure.

Design (why not one PgBouncer with an entry per tenant): a reload re-reads
every [databases] entry and stalls all clients (~0.7 s at 20,000 entries on
PgBouncer 1.18). So the agent runs one PgBouncer process per tier, whose
*global* pool settings are the tier's and whose only [databases] entry is a
wildcard. A tenant without pool overrides needs no entry at all: a tier change
moves it to another process (a routing change for the proxy) and reloads
nothing. Only tenants with their own pool overrides get explicit entries, in
their tier's process, so a reload touches a handful of lines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynabase.spec import TenantDatabase, TierPolicy
from dynabase.spec.limit import PgBouncerPlace
from dynabase.spec.limits import FIELDS

from .effective import PgBouncerEffective, ResolveError, merge
from .transition import TierDecision

# Where the engine publishes the layout and agents report back: dynabase.keyspace.
DEFAULT_POOL = "_default"  # always present: a stable admin endpoint and a fallback pool


_POOL_FIELDS = FIELDS["pgbouncer"]
_POOL_NAMES = tuple(f.name for f in _POOL_FIELDS)


@dataclass(frozen=True)
class PoolSettings(PgBouncerEffective):
    """A pool's settings: the effective pgbouncer limits of its tier or tenant (the same fields)."""

    @classmethod
    def of(cls, limits: PgBouncerEffective) -> PoolSettings:
        return cls(**{name: getattr(limits, name) for name in _POOL_NAMES})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _POOL_NAMES}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PoolSettings:
        # Keys unknown to this version are ignored and missing ones take their default,
        # so agents and engines of neighbouring versions read each other's layouts.
        return cls(**{name: raw[name] for name in _POOL_NAMES if name in raw})

    def pairs(self, place: PgBouncerPlace) -> list[tuple[str, str]]:
        """(key, value) for the [pgbouncer] section, a [databases] or [users] entry, or SHOW DATABASES."""
        out = []
        for declared in _POOL_FIELDS:
            key = declared.limit.pgbouncer.key(place) if declared.limit.pgbouncer is not None else None
            if key is not None:
                out.append((key, str(getattr(self, declared.name))))
        return out

    def entry(self, place: PgBouncerPlace) -> str:
        return " ".join(f"{key}={value}" for key, value in self.pairs(place))


@dataclass(frozen=True)
class TenantRoute:
    database: str
    role: str
    pool: str  # name of the PgBouncer process (tier pool) that serves it
    settings: PoolSettings | None = None  # only when it differs from the pool's own
    enabled: bool = True  # suspended tenants are disabled in PgBouncer too


@dataclass
class PgBouncerDesired:
    pools: dict[str, PoolSettings] = field(default_factory=dict)
    routes: dict[str, TenantRoute] = field(default_factory=dict)  # by database
    # Publication counter (not part of the content hash): agents report the highest
    # they applied, so concurrent publishers can tell "applied mine or newer".
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        # By hand rather than dataclasses.asdict: this runs over 10,000 routes per pass.
        def settings(p: PoolSettings | None) -> dict[str, Any] | None:
            return None if p is None else p.to_dict()

        return {
            "pools": {k: settings(v) for k, v in sorted(self.pools.items())},
            "routes": {
                k: {"database": r.database, "role": r.role, "pool": r.pool, "settings": settings(r.settings),
                    "enabled": r.enabled}
                for k, r in sorted(self.routes.items())
            },
        }

    @property
    def version(self) -> str:
        """Content hash; O(routes), so callers compute it once per pass."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def rendered_version(self) -> str:
        """Hash of what the agents render from it (render_ini): the pools and the routes with settings of
        their own. A layout that changes only other routes (a new tenant in a running pool) changes no
        PgBouncer, so the agents' report on the previous layout holds for it too."""
        rendered = {"pools": {k: v.to_dict() for k, v in sorted(self.pools.items())},
                    "routes": {k: [r.role, r.pool, r.settings.to_dict()] for k, r in sorted(self.routes.items())
                               if r.settings is not None}}
        return hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self, version: str | None = None, seq: int | None = None) -> str:
        return json.dumps(
            {"version": version or self.version, "seq": self.seq if seq is None else seq, **self.to_dict()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PgBouncerDesired:
        raw = json.loads(text)
        pools = {k: PoolSettings.from_dict(v) for k, v in raw.get("pools", {}).items()}
        routes = {}
        for k, v in raw.get("routes", {}).items():
            settings = PoolSettings.from_dict(v["settings"]) if v.get("settings") else None
            routes[k] = TenantRoute(v["database"], v["role"], v["pool"], settings, v.get("enabled", True))
        return cls(pools, routes, int(raw.get("seq", 0)))

    def explicit_routes(self, pool: str) -> list[TenantRoute]:
        return sorted(
            (r for r in self.routes.values() if r.pool == pool and r.settings is not None),
            key=lambda r: r.database,
        )


def pool_name(policy: str, tier: str) -> str:
    return f"{policy}.{tier}"


@dataclass(frozen=True)
class AgentConfig:
    """Where one agent's PgBouncer processes listen and find Postgres."""

    listen_host: str
    postgres_host: str
    postgres_port: int
    auth_user: str
    auth_query: str
    auth_file: str
    admin_user: str
    workdir: str


def render_ini(desired: PgBouncerDesired, pool: str, port: int, config: AgentConfig) -> str:
    settings = desired.pools[pool]
    backend = f"host={config.postgres_host} port={config.postgres_port} auth_user={config.auth_user}"
    lines = ["; rendered by dynabase pgbouncer-agent; do not edit", "[databases]"]
    # Suspended tenants need no entry: their role is NOLOGIN, so auth_query refuses them.
    for route in desired.explicit_routes(pool):
        lines.append(f"{route.database} = {backend} {(route.settings or settings).entry('database')}")
    lines.append(f"* = {backend}")
    user_lines = [
        f"{r.role} = {r.settings.entry('user')}" for r in desired.explicit_routes(pool) if r.settings is not None
    ]
    if user_lines:
        lines += ["", "[users]", *user_lines]
    lines += [
        "",
        "[pgbouncer]",
        f"listen_addr = {config.listen_host}",
        f"listen_port = {port}",
        f"unix_socket_dir = {config.workdir}",
        f"pidfile = {config.workdir}/{pool}.pid",
        "auth_type = scram-sha-256",
        f"auth_file = {config.auth_file}",
        f"auth_query = {config.auth_query}",
        f"admin_users = {config.admin_user}",
        f"stats_users = {config.admin_user}",
        *(f"{key} = {value}" for key, value in settings.pairs("ini")),
        "max_client_conn = 10000",
        "server_idle_timeout = 60",
        # After a failed server login PgBouncer refuses every client of the pool for this long (default
        # 15 s): once Postgres is back from a restart, clients wait at most a second.
        "server_login_retry = 1",
        "ignore_startup_parameters = extra_float_digits,options,application_name",
        "server_reset_query = DISCARD ALL",
        "log_connections = 0",
        "log_disconnections = 0",
        "",
    ]
    return "\n".join(lines)


def plan_lines(old: PgBouncerDesired | None, new: PgBouncerDesired, database: str) -> list[str]:
    """What changes for one tenant, for `dynabase plan`."""
    before = old.routes.get(database) if old else None
    after = new.routes.get(database)
    if before == after and (after is None or old is None or old.pools.get(after.pool) == new.pools.get(after.pool)):
        return []
    if after is None:
        return [f"remove route for {database}"] if before else []
    settings = after.settings or new.pools[after.pool]
    text = (f"route {database} to pool {after.pool} ({settings.entry('database')}"
            f"{'' if after.enabled else ', disabled'})")
    if before is None:
        return [text]
    return [f"{text}; was pool {before.pool}"]


def layout(
    policies: Mapping[str, TierPolicy],
    tenants: Iterable[tuple[TenantDatabase, TierDecision | None]],
    deleted: Iterable[TenantDatabase],
    published: PgBouncerDesired | None,
    *,
    complete: bool,
) -> PgBouncerDesired:
    """The layout to publish: ``tenants`` routed to their tier's pool, ``deleted`` unrouted.

    ``complete`` says ``tenants`` are all tenants: the layout is rebuilt from them. Otherwise
    the published layout is patched, and tenants not named keep their routes.
    """
    base = published or PgBouncerDesired()
    desired = PgBouncerDesired(
        pools={} if complete else dict(base.pools),
        routes={} if complete else dict(base.routes),
    )
    # Every tier of every policy gets its pool up front, so a tier change lands on a running one.
    for policy_name, policy in policies.items():
        for tier_name, tier in policy.spec.tiers.items():
            try:
                limits = merge(tier_name, tier.rank, [tier])
            except ResolveError:
                continue
            desired.pools[pool_name(policy_name, tier_name)] = PoolSettings.of(limits.pgbouncer)
    for tenant in deleted:
        desired.routes.pop(tenant.database_name, None)
    for tenant, decision in tenants:
        database = tenant.database_name
        if decision is None:
            # Unresolvable now: keep serving it as it was rather than drop its route (or its pool).
            if database in base.routes:
                route = desired.routes[database] = base.routes[database]
                if route.pool in base.pools:
                    desired.pools.setdefault(route.pool, base.pools[route.pool])
            continue
        pool = pool_name(tenant.spec.tier_policy_ref, decision.applied_tier)
        own = PoolSettings.of(decision.limits.pgbouncer)
        desired.routes[database] = TenantRoute(
            database=database, role=tenant.database_name, pool=pool,
            settings=None if own == desired.pools.get(pool) else own,
            enabled=not tenant.spec.suspended,
        )
    return desired
