"""Postgres backend: observe all tenants in one round of catalog queries, apply
one tenant's plan in one transaction (plus the statements that cannot run in one)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from dynabase.desired.pg_hba import HbaRule, PgHbaObserved
from dynabase.desired.postgres import FORBIDDEN_ATTRIBUTES, PGBOUNCER_AUTH_ROLE, PostgresPlan, Statement
from dynabase.desired.postgres_observed import (
    ObservedDatabase,
    ObservedRole,
    PostgresObserved,
    connect_grantees,
    parse_setconfig,
)
from dynabase.desired.sql import quote_ident
from dynabase.desired.warm_pool import POOL_OWNER, count_by_prefix

from . import warm_pool
from .platform_schema import SCHEMA_LOCK

log = logging.getLogger(__name__)

PGBOUNCER_AUTH_QUERY = "SELECT usename, passwd FROM dynabase_pgbouncer.lookup($1)"

_OBSERVE_ROLES = """
SELECT a.rolname, a.rolcanlogin, a.rolconnlimit, a.rolpassword,
       a.rolsuper, a.rolcreatedb, a.rolcreaterole, a.rolreplication, a.rolbypassrls,
       d.description AS comment, s.setconfig
FROM pg_catalog.pg_authid a
LEFT JOIN pg_catalog.pg_db_role_setting s ON s.setrole = a.oid AND s.setdatabase = 0
LEFT JOIN pg_catalog.pg_shdescription d
       ON d.objoid = a.oid AND d.classoid = 'pg_catalog.pg_authid'::regclass
WHERE a.rolname = ANY($1::text[])
"""
_OBSERVE_DATABASES = """
SELECT d.datname, pg_catalog.pg_get_userbyid(d.datdba) AS owner, d.datallowconn,
       d.datacl::text[] AS acl
FROM pg_catalog.pg_database d
WHERE d.datname = ANY($1::text[])
"""
_OBSERVE_SESSIONS = """
SELECT usename, count(*) AS n FROM pg_catalog.pg_stat_activity
WHERE usename = ANY($1::text[]) GROUP BY usename
"""

# pg_hba.conf as it is on disk (what a reload loads); readable by superusers only.
_OBSERVE_HBA = """
SELECT line_number, type, database, user_name, address, netmask, auth_method, error
FROM pg_catalog.pg_hba_file_rules ORDER BY line_number
"""
# The roles each tenant role is a member of, directly or through others (for +group and samerole lines).
_OBSERVE_MEMBERSHIPS = """
WITH RECURSIVE member_of(member, roleid) AS (
    SELECT m.member, m.roleid FROM pg_catalog.pg_auth_members m
    JOIN pg_catalog.pg_roles r ON r.oid = m.member WHERE r.rolname = ANY($1::text[])
  UNION
    SELECT g.member, m.roleid FROM member_of g JOIN pg_catalog.pg_auth_members m ON m.member = g.roleid
)
SELECT r.rolname AS role, array_agg(DISTINCT g.rolname) AS groups
FROM member_of x JOIN pg_catalog.pg_roles r ON r.oid = x.member JOIN pg_catalog.pg_roles g ON g.oid = x.roleid
GROUP BY r.rolname
"""

# PgBouncer looks tenants up through this function instead of a userlist file, so
# no tenant secret is written to PgBouncer's disk. It lives in template1, so every
# tenant database is created with it; only the auth role may execute it, and it
# answers only for login roles DynaBase manages (never a superuser).
_BOOTSTRAP_TEMPLATE = """
CREATE SCHEMA IF NOT EXISTS dynabase_pgbouncer;
CREATE OR REPLACE FUNCTION dynabase_pgbouncer.lookup(p_usename text, OUT usename name, OUT passwd text)
RETURNS record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT a.rolname, a.rolpassword
  FROM pg_catalog.pg_authid a
  JOIN pg_catalog.pg_shdescription d
    ON d.objoid = a.oid AND d.classoid = 'pg_catalog.pg_authid'::regclass
  WHERE a.rolname = p_usename AND a.rolcanlogin AND NOT a.rolsuper
    AND d.description LIKE 'dynabase:%'
$fn$;
REVOKE ALL ON FUNCTION dynabase_pgbouncer.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA dynabase_pgbouncer TO dynabase_pgbouncer;
GRANT EXECUTE ON FUNCTION dynabase_pgbouncer.lookup(text) TO dynabase_pgbouncer;
"""


_ATTRIBUTE_COLUMNS = {
    "superuser": "rolsuper",
    "createdb": "rolcreatedb",
    "createrole": "rolcreaterole",
    "replication": "rolreplication",
    "bypassrls": "rolbypassrls",
}


@dataclass
class StatementCounter:
    reads: int = 0
    writes: int = 0


@dataclass(frozen=True)
class Applied:
    ended: int = 0  # sessions the plan's statements ended
    claimed: str | None = None  # the warm pool database renamed to the tenant's, if any
    pool_empty: bool = False  # the plan would have claimed one but none was left: it created the database


class PostgresBackend:
    name = "postgres"

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self.counter = StatementCounter()

    async def start(self) -> None:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, command_timeout=60,
                server_settings={"application_name": "dynabase-engine"},
            )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresBackend.start() was not awaited")
        return self._pool

    async def bootstrap(self) -> None:
        """Platform objects the tenants rely on; observed first, written only when missing.

        Several engines (replicas, a `dynabase apply` beside headless mode) may bootstrap
        at once: the platform schema lock makes the check and the creation one step.
        """
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
            try:
                self.counter.reads += 1
                has_role = await conn.fetchval("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                                               PGBOUNCER_AUTH_ROLE)
                if not has_role:
                    self.counter.writes += 1
                    await conn.execute(f"CREATE ROLE {quote_ident(PGBOUNCER_AUTH_ROLE)} LOGIN NOINHERIT")
                if not await conn.fetchval("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", POOL_OWNER):
                    self.counter.writes += 1
                    await conn.execute(f"CREATE ROLE {quote_ident(POOL_OWNER)} NOLOGIN")
                if await self._bootstrap_template():
                    # Pool databases copied from the template before this change lack it: never hand them out.
                    for oid, name in await warm_pool.pool_databases(conn):
                        await warm_pool.drop_unclaimed(conn, oid, name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK)

    async def _bootstrap_template(self) -> bool:
        """Whether template1 had to be written."""
        template = await asyncpg.connect(self._dsn, database="template1")
        try:
            self.counter.reads += 1
            present = await template.fetchval(
                "SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = $1 AND p.proname = 'lookup'",
                PGBOUNCER_AUTH_ROLE,
            )
            if not present:
                self.counter.writes += 1
                await template.execute(_BOOTSTRAP_TEMPLATE)
            return not present
        finally:
            await template.close()

    async def observe(self, roles: Iterable[str], databases: Iterable[str]) -> PostgresObserved:
        role_names, db_names = sorted(set(roles)), sorted(set(databases))
        observed = PostgresObserved()
        async with self.pool.acquire() as conn:
            self.counter.reads += 3
            for row in await conn.fetch(_OBSERVE_ROLES, role_names):
                attributes = frozenset(a for a in FORBIDDEN_ATTRIBUTES if row[_ATTRIBUTE_COLUMNS[a]])
                observed.roles[row["rolname"]] = ObservedRole(
                    name=row["rolname"],
                    login=row["rolcanlogin"],
                    connection_limit=row["rolconnlimit"],
                    attributes=attributes,
                    settings=parse_setconfig(row["setconfig"]),
                    comment=row["comment"],
                    verifier=row["rolpassword"],
                )
            for row in await conn.fetch(_OBSERVE_DATABASES, db_names):
                observed.databases[row["datname"]] = ObservedDatabase(
                    name=row["datname"],
                    owner=row["owner"],
                    allow_connections=row["datallowconn"],
                    connect_grantees=connect_grantees(row["acl"], row["owner"]),
                )
            for row in await conn.fetch(_OBSERVE_SESSIONS, role_names):
                observed.sessions[row["usename"]] = row["n"]
            if len(observed.databases) < len(db_names):  # someone's database is missing: can the pool give one?
                self.counter.reads += 1
                observed.warm_pool = count_by_prefix(name for _oid, name in await warm_pool.pool_databases(conn))
        return observed

    async def observe_hba(self, roles: Iterable[str]) -> PgHbaObserved:
        """pg_hba.conf's lines, and the groups of ``roles`` when a line names groups."""
        async with self.pool.acquire() as conn:
            self.counter.reads += 1
            rules = tuple(
                HbaRule(line_number=row["line_number"], type=row["type"], databases=tuple(row["database"] or ()),
                        users=tuple(row["user_name"] or ()), address=row["address"], netmask=row["netmask"],
                        auth_method=row["auth_method"] or "", error=row["error"])
                for row in await conn.fetch(_OBSERVE_HBA)
            )
            memberships: dict[str, frozenset[str]] = {}
            if any(rule.uses_groups for rule in rules):
                self.counter.reads += 1
                for row in await conn.fetch(_OBSERVE_MEMBERSHIPS, sorted(set(roles))):
                    memberships[row["role"]] = frozenset(row["groups"])
        return PgHbaObserved(rules, memberships)

    async def apply(self, plan: PostgresPlan) -> Applied:
        """Consecutive transactional statements share one transaction.

        A warm pool claim commits with the statements before it in its transaction
        (the tenant's role) and the ones after it (owner, grants). When no pool database
        is left by then, what came before it commits and ``plan.fallback`` runs instead
        of the rest.
        """
        if plan.conflict or plan.empty:
            return Applied()
        async with self.pool.acquire() as conn:
            ended, claimed = await self._run(conn, plan.statements)
            if claimed is None:
                more, _ = await self._run(conn, plan.fallback)
                return Applied(ended + more, pool_empty=True)
        return Applied(ended, claimed or None)

    async def _run(self, conn: asyncpg.Connection, plan: tuple[Statement, ...]) -> tuple[int, str | None]:
        """Sessions ended, and the claimed pool database ("" when there was no claim, None when it found none)."""
        ended, claimed = 0, ""
        for transactional, statements in _groups(plan):
            if not transactional:
                ended += await self._execute(conn, statements[0])
                continue
            async with conn.transaction():
                for statement in statements:
                    if statement.claim is None:
                        ended += await self._execute(conn, statement)
                        continue
                    self.counter.writes += 1
                    found = await warm_pool.claim(conn, statement.claim.prefix, statement.claim.database)
                    if found is None:
                        return ended, None  # leaving the block commits what came before the claim
                    claimed = found
        return ended, claimed

    async def _execute(self, conn: asyncpg.Connection, statement: Statement) -> int:
        self.counter.writes += 1
        log.debug("postgres statement", extra={"sql": statement.display})
        if statement.ends_sessions:
            return int(await conn.fetchval(statement.sql, *statement.args) or 0)
        if statement.args:
            await conn.fetch(statement.sql, *statement.args)
        else:
            await conn.execute(statement.sql)
        return 0


def _groups(plan: tuple[Statement, ...]) -> list[tuple[bool, list[Statement]]]:
    groups: list[tuple[bool, list[Statement]]] = []
    for statement in plan:
        if groups and groups[-1][0] and statement.transactional:
            groups[-1][1].append(statement)
        else:
            groups.append((statement.transactional, [statement]))
    return groups
