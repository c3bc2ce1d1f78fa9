"""Postgres: per-tenant target state, observed state, and the diff between them.

Everything here is pure. The backend gathers ``PostgresObserved`` in one round
of catalog queries and executes the ``Statement``s of a ``PostgresPlan``; the
same plan renders as text for ``dynabase plan`` with secrets redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dynabase.spec import TenantDatabase
from dynabase.spec.limits import FIELDS
from dynabase.spec.units import ByteSize, Duration

from . import drain
from .effective import EffectiveLimits, PostgresEffective
from .postgres_observed import ObservedDatabase, ObservedRole, PostgresObserved
from .scram import new_verifier, password_ok
from .sql import quote_ident, quote_literal

MARKER_PREFIX = "dynabase:"
# The limits declared with a role setting, by setting name.
_ROLE_SETTINGS = {f.limit.role_setting: f.name for f in FIELDS["postgres"] if f.limit.role_setting}
MANAGED_SETTINGS = (
    *_ROLE_SETTINGS,
    "default_transaction_read_only",  # set while a tenant over its included usage is restricted
)
# A tenant role is a plain login role; any of these would let it escape its tier.
FORBIDDEN_ATTRIBUTES = ("superuser", "createdb", "createrole", "replication", "bypassrls")

TenantState = Literal["active", "suspended", "retained", "deleted"]


class Password:
    """A secret that never renders: repr/str show a placeholder."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Password(***)"

    __str__ = __repr__


def render_duration_ms(milliseconds: int) -> str:
    # Postgres' time units are ms, s, min, h, d ("m" is not one), so stay with s/ms.
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def render_kilobytes(count_bytes: int) -> str:
    kb = max(count_bytes // 1024, 0)
    for unit, size in (("GB", 1024 * 1024), ("MB", 1024)):
        if kb and kb % size == 0:
            return f"{kb // size}{unit}"
    return f"{kb}kB"


def role_settings(limits: PostgresEffective) -> dict[str, str]:
    out: dict[str, str] = {}
    for setting, name in _ROLE_SETTINGS.items():
        value = getattr(limits, name)
        if isinstance(value, Duration):
            out[setting] = render_duration_ms(value.milliseconds)
        elif isinstance(value, ByteSize):
            out[setting] = render_kilobytes(value.bytes)
    return out


@dataclass(frozen=True)
class PostgresTarget:
    key: str  # namespace/name of the TenantDatabase
    role: str
    database: str
    state: TenantState
    connection_limit: int
    settings: dict[str, str]
    password: Password | None = field(default=None, repr=False)
    # Roles besides the tenant that need CONNECT (PgBouncer's auth_query user).
    service_roles: tuple[str, ...] = ()
    # Scaled to zero: sessions idle longer than this many seconds are ended (None = not cold).
    cold_after_seconds: int | None = None
    # Names of the warm pool databases it may claim start with this (desired.warm_pool); None: none.
    warm_pool: str | None = None

    @property
    def marker(self) -> str:
        return MARKER_PREFIX + self.key

    @property
    def login(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class Claim:
    """Rename one unclaimed warm pool database to ``database``; which one is chosen when it runs."""

    prefix: str
    database: str


@dataclass(frozen=True)
class Statement:
    sql: str
    display: str  # what plans and logs show: the SQL with secrets replaced
    args: tuple[object, ...] = ()
    transactional: bool = True  # CREATE/DROP DATABASE cannot run in a transaction block
    ends_sessions: bool = False  # answers with the number of sessions it ended
    claim: Claim | None = None  # run as the rename of a pool database the backend picks and locks


@dataclass(frozen=True)
class PostgresPlan:
    key: str
    statements: tuple[Statement, ...]
    conflict: str | None = None  # why nothing may be done (the role belongs to someone else)
    # When the pool is empty by the time the claim runs, the statements from the claim on
    # are replaced by these (CREATE DATABASE and the same grants).
    fallback: tuple[Statement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.statements


def _stmt(sql: str, *, display: str | None = None, args: tuple[object, ...] = (), tx: bool = True,
          ends_sessions: bool = False) -> Statement:
    return Statement(sql, display if display is not None else sql, args, tx, ends_sessions)


def needs_database(target: PostgresTarget, observed: PostgresObserved) -> bool:
    return target.state in ("active", "suspended") and target.database not in observed.databases


def plan_postgres(target: PostgresTarget, observed: PostgresObserved, *, claim: bool = False) -> PostgresPlan:
    """``claim``: the database is missing and one of the target's warm pool databases is left for it."""
    role = observed.roles.get(target.role)
    if role is not None and role.comment != target.marker:
        if role.comment and role.comment.startswith(MARKER_PREFIX):
            why = (f"role {target.role} belongs to TenantDatabase {role.comment[len(MARKER_PREFIX):]}; "
                   "two tenants cannot share a databaseName")
        else:
            why = (f"role {target.role} exists and is not managed by DynaBase; refusing to take it over "
                   "(choose another databaseName, or mark the role with COMMENT ON ROLE … IS "
                   f"'{target.marker}' to adopt it)")
        return PostgresPlan(target.key, (), why)
    if target.state == "deleted":
        return PostgresPlan(target.key, tuple(_drop(target, observed, role)))
    statements: list[Statement] = []
    statements += _role_statements(target, role)
    sessions = observed.sessions.get(target.role, 0)
    if target.state != "active" and sessions > 0:
        statements.append(_terminate(target.role))
    elif target.state == "active" and 0 <= target.connection_limit < sessions:
        statements.append(_drain(target.role, target.connection_limit))
    elif target.state == "active" and target.cold_after_seconds is not None and sessions > 0:
        statements.append(_end_idle(target.role, target.cold_after_seconds))
    if target.state not in ("active", "suspended"):
        return PostgresPlan(target.key, tuple(statements))
    database = observed.databases.get(target.database)
    if database is None and claim and target.warm_pool is not None:
        claimed = _claimed_statements(target, target.warm_pool)
        return PostgresPlan(target.key, (*statements, *claimed), fallback=tuple(_database_statements(target, None)))
    return PostgresPlan(target.key, (*statements, *_database_statements(target, database)))


def _terminate(role: str) -> Statement:
    return _stmt(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
        display=f"terminate sessions of {quote_ident(role)}",
        args=(role,),
    )


# Both count and choose when they run, not from the observation, so they never end
# more than the excess at that moment; each runs on its own after the role change.
_DRAIN_SQL = f"""
SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM (
  SELECT pid FROM pg_catalog.pg_stat_activity
  WHERE usename = $1 AND backend_type = 'client backend'
  ORDER BY {drain.ORDER_SQL}
  LIMIT greatest(0, (SELECT count(*) FROM pg_catalog.pg_stat_activity
                     WHERE usename = $1 AND backend_type = 'client backend') - $2)
) AS excess
"""  # noqa: S608 - ORDER BY is a constant (desired/drain.py), not input
# A session that woke the tenant a moment ago is never idle for that long, so it is safe.
_END_IDLE_SQL = """
SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity
WHERE usename = $1 AND backend_type = 'client backend' AND state = 'idle'
  AND state_change < now() - make_interval(secs => $2)
"""


def _drain(role: str, limit: int) -> Statement:
    return _stmt(_DRAIN_SQL, args=(role, limit), tx=False, ends_sessions=True,
                 display=f"end sessions of {quote_ident(role)} over its connection limit of {limit} "
                         "(idle first, then newest)")


def _end_idle(role: str, idle_seconds: int) -> Statement:
    return _stmt(_END_IDLE_SQL, args=(role, float(idle_seconds)), tx=False, ends_sessions=True,
                 display=f"end sessions of {quote_ident(role)} idle for {idle_seconds}s or more (cold)")


def _role_statements(target: PostgresTarget, role: ObservedRole | None) -> list[Statement]:
    ident = quote_ident(target.role)
    out: list[Statement] = []
    login = "LOGIN" if target.login else "NOLOGIN"
    limit = f"CONNECTION LIMIT {int(target.connection_limit)}"
    negated = " ".join(f"NO{a.upper()}" for a in FORBIDDEN_ATTRIBUTES)
    if role is None:
        password_sql, password_display = "", ""
        if target.password is not None:
            verifier = new_verifier(target.password.reveal())
            password_sql = f" PASSWORD {quote_literal(verifier)}"
            password_display = " PASSWORD '***'"
        head = f"CREATE ROLE {ident} {login} {negated} {limit}"
        out.append(_stmt(head + password_sql, display=head + password_display))
        out.append(_stmt(f"COMMENT ON ROLE {ident} IS {quote_literal(target.marker)}"))
        current_settings: dict[str, str] = {}
    else:
        changes = []
        if role.login != target.login:
            changes.append(login)
        if role.connection_limit != target.connection_limit:
            changes.append(limit)
        changes += [f"NO{a.upper()}" for a in sorted(role.attributes)]
        if changes:
            out.append(_stmt(f"ALTER ROLE {ident} {' '.join(changes)}"))
        if target.password is not None and not password_ok(role.verifier, target.password.reveal()):
            verifier = new_verifier(target.password.reveal())
            out.append(
                _stmt(f"ALTER ROLE {ident} PASSWORD {quote_literal(verifier)}",
                      display=f"ALTER ROLE {ident} PASSWORD '***'")
            )
        current_settings = role.settings
    for name in MANAGED_SETTINGS:
        wanted, have = target.settings.get(name), current_settings.get(name)
        if wanted is not None and wanted != have:
            out.append(_stmt(f"ALTER ROLE {ident} SET {name} = {quote_literal(wanted)}"))
        elif wanted is None and have is not None:
            out.append(_stmt(f"ALTER ROLE {ident} RESET {name}"))
    return out


def _grants(target: PostgresTarget) -> list[Statement]:
    """Locked down, then opened to the tenant and the service roles, in this order on both paths:
    the ACL comes out the same whether the database was created or claimed."""
    db = quote_ident(target.database)
    return [
        _stmt(f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC"),
        _grant(target.database, target.role, "CONNECT, TEMPORARY"),
        *(_grant(target.database, r) for r in target.service_roles),
        _stmt(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true"),
    ]


def _grant(database: str, grantee: str, privileges: str = "CONNECT") -> Statement:
    return _stmt(f"GRANT {privileges} ON DATABASE {quote_ident(database)} TO {quote_ident(grantee)}")


def _claimed_statements(target: PostgresTarget, prefix: str) -> list[Statement]:
    """A warm pool database renamed and given to the tenant in the role's transaction.

    The pool database is closed (no connections, no PUBLIC CONNECT) and owned by the
    pool role; the owner change moves the owner's privileges to the tenant, as
    CREATE DATABASE … OWNER would have, and the grants are the created path's.
    """
    db, role = quote_ident(target.database), quote_ident(target.role)
    rename = Statement(f"ALTER DATABASE <{prefix}…> RENAME TO {db}",
                       f"ALTER DATABASE <a warm pool database {prefix}…> RENAME TO {db}",
                       claim=Claim(prefix, target.database))
    return [rename, _stmt(f"ALTER DATABASE {db} OWNER TO {role}"), *_grants(target)]


def _database_statements(target: PostgresTarget, database: ObservedDatabase | None) -> list[Statement]:
    db, role = quote_ident(target.database), quote_ident(target.role)
    revoke = _stmt(f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC")

    def grant(grantee: str, privileges: str = "CONNECT") -> Statement:
        return _grant(target.database, grantee, privileges)

    if database is None:
        # Created closed, locked down, then opened: PUBLIC never gets a window to connect.
        return [_stmt(f"CREATE DATABASE {db} OWNER {role} ALLOW_CONNECTIONS false", tx=False), *_grants(target)]
    out: list[Statement] = []
    if database.owner != target.role:
        out.append(_stmt(f"ALTER DATABASE {db} OWNER TO {role}"))
    grantees = database.connect_grantees
    if "" in grantees:
        out.append(revoke)
    if target.role not in grantees:
        out.append(grant(target.role, "CONNECT, TEMPORARY"))
    out += [grant(r) for r in target.service_roles if r not in grantees]
    if not database.allow_connections:
        out.append(_stmt(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
    return out


def _drop(target: PostgresTarget, observed: PostgresObserved, role: ObservedRole | None) -> list[Statement]:
    out: list[Statement] = []
    if role is not None and observed.sessions.get(target.role, 0) > 0:
        out.append(_terminate(target.role))
    if target.database in observed.databases:
        out.append(_stmt(f"DROP DATABASE IF EXISTS {quote_ident(target.database)} WITH (FORCE)", tx=False))
    if role is not None:
        out.append(_stmt(f"DROP ROLE IF EXISTS {quote_ident(target.role)}", tx=False))
    return out


def render_plan(plan: PostgresPlan) -> list[str]:
    if plan.conflict:
        return [f"! {plan.conflict}"]
    return [s.display for s in plan.statements]


# -- what a tenant's role and database should be --------------------------------

# The role PgBouncer logs in as to look up tenants' verifiers (auth_query); every tenant
# database grants it CONNECT.
PGBOUNCER_AUTH_ROLE = "dynabase_pgbouncer"


def restricted_settings(settings: dict[str, str], restriction: str | None) -> dict[str, str]:
    """A tenant restricted to reads (over its included usage) gets read-only transactions by default."""
    if restriction == "readOnly":
        return {**settings, "default_transaction_read_only": "on"}
    return settings


def tenant_target(tenant: TenantDatabase, limits: EffectiveLimits, *, password: Password | None,
                  restriction: str | None, cold: bool, warm_pool: str | None = None) -> PostgresTarget:
    state: TenantState = "suspended" if tenant.spec.suspended else "active"
    idle_timeout = limits.lifecycle.idle_timeout
    return PostgresTarget(
        key=tenant.key,
        role=tenant.database_name,
        database=tenant.database_name,
        state=state,
        connection_limit=limits.postgres.connection_limit,
        settings=restricted_settings(role_settings(limits.postgres), restriction),
        password=password,
        service_roles=(PGBOUNCER_AUTH_ROLE,),
        cold_after_seconds=idle_timeout.milliseconds // 1000 if cold and idle_timeout else None,
        warm_pool=warm_pool,
    )


def deletion_target(tenant: TenantDatabase) -> PostgresTarget:
    state: TenantState = "deleted" if tenant.spec.deletion_policy == "Delete" else "retained"
    return PostgresTarget(
        key=tenant.key, role=tenant.database_name, database=tenant.database_name, state=state,
        connection_limit=0, settings={}, service_roles=(PGBOUNCER_AUTH_ROLE,),
    )


def lowers_connection_limit(target: PostgresTarget, observed: PostgresObserved) -> bool:
    """Whether applying ``target`` lowers the role's connection limit (negative means unlimited)."""
    role = observed.roles.get(target.role)
    if role is None or target.state != "active":
        return False
    have, want = role.connection_limit, target.connection_limit
    return want >= 0 and (have < 0 or want < have)
