"""The tenant portal's log-in in Postgres: a tenant role's SCRAM verifier (``pg_authid``) and the
portal's sessions (``dynabase.portal_sessions``).

A session row holds a SHA-256 of the cookie's token (a stolen table opens no
session) and of the role's verifier at log-in: changing the database password
ends every portal session of that tenant at its next request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import asyncpg

from .platform_schema import create_once

TABLE = "dynabase.portal_sessions"
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.portal_sessions (
    token_hash bytea PRIMARY KEY,
    tenant_key text NOT NULL,
    role text NOT NULL,
    csrf text NOT NULL,
    verifier_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_sessions_expiry ON dynabase.portal_sessions (expires_at);
"""


@dataclass(frozen=True)
class RoleLogin:
    verifier: str | None
    valid_until: dt.datetime | None


@dataclass(frozen=True)
class Session:
    tenant: str
    role: str
    csrf: str  # the token the session's forms carry (log-out)
    expires_at: dt.datetime


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class PortalStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            await create_once(self._pool, TABLE, _SCHEMA)
            self._ready = True

    async def role_login(self, role: str) -> RoleLogin | None:
        """The role's stored verifier (None for a role that cannot log in), or None if no such role."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT CASE WHEN rolcanlogin THEN rolpassword END AS verifier, rolvaliduntil "
                "FROM pg_authid WHERE rolname = $1", role)
        return RoleLogin(row["verifier"], row["rolvaliduntil"]) if row is not None else None

    async def open(self, tenant: str, role: str, verifier: str, lifetime: dt.timedelta) -> tuple[str, Session]:
        """A new session: the cookie's token (returned once, stored only hashed) and the session."""
        await self._ensure()
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        async with self._pool.acquire() as conn:
            expires = await conn.fetchval(
                "INSERT INTO dynabase.portal_sessions (token_hash, tenant_key, role, csrf, verifier_hash, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, now() + $6::interval) RETURNING expires_at",
                _digest(token), tenant, role, csrf, _digest(verifier), lifetime)
            # Expired sessions go with each log-in; nothing else needs to sweep them.
            await conn.execute("DELETE FROM dynabase.portal_sessions WHERE expires_at < now()")
        return token, Session(tenant, role, csrf, expires)

    async def session(self, token: str) -> Session | None:
        """The live session of this token: unexpired, and the role's password unchanged since log-in."""
        await self._ensure()
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT s.tenant_key, s.role, s.csrf, s.expires_at FROM dynabase.portal_sessions s "
                "JOIN pg_authid a ON a.rolname = s.role "
                "WHERE s.token_hash = $1 AND s.expires_at > now() AND a.rolcanlogin "
                "AND s.verifier_hash = sha256(convert_to(coalesce(a.rolpassword, ''), 'UTF8'))",
                _digest(token))
        return Session(row["tenant_key"], row["role"], row["csrf"], row["expires_at"]) if row is not None else None

    async def close(self, token: str) -> None:
        await self._ensure()
        async with self._pool.acquire() as conn:
            await conn.execute("DELETE FROM dynabase.portal_sessions WHERE token_hash = $1", _digest(token))
