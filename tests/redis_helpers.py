"""Two tenants' ACL users written by the real Redis backend, an admin connection, and what the engine does with them."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.redis import RedisTarget, acl_drift, password_hash

from .engine_helpers import unique


@dataclass
class Tenant:
    database: str
    password: str
    target: RedisTarget

    @property
    def prefix(self) -> str:
        return f"t:{self.database}:"


def new_tenant(name: str) -> Tenant:
    database, password = unique(name), secrets.token_urlsafe(12)
    return Tenant(database, password, RedisTarget(database, database, password_hash(password), False))


@dataclass
class Tenants:
    backend: RedisBackend
    admin: redis.Redis  # COMMAND replies left raw
    url: str
    acme: Tenant
    globex: Tenant
    clients: list[redis.Redis] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def connect(self, tenant: Tenant) -> redis.Redis:
        client = redis.Redis(host="127.0.0.1", port=self.port, username=tenant.target.username,
                             password=tenant.password, decode_responses=True)
        self.clients.append(client)
        return client

    async def write(self, tenant: Tenant, *, read_only: bool = False) -> None:
        tenant.target = RedisTarget(tenant.database, tenant.database, tenant.target.password_sha256, read_only)
        await self.backend.apply(tenant.target)


def raw_admin(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set_response_callback("COMMAND", lambda response, **kwargs: response)
    return client


@asynccontextmanager
async def two_tenants(url: str) -> AsyncIterator[Tenants]:
    """acme and globex, each with its ACL user as the backend writes it; users and keys removed afterwards."""
    built = Tenants(RedisBackend(url), raw_admin(url), url, new_tenant("acme"), new_tenant("globex"))
    try:
        for tenant in (built.acme, built.globex):
            await built.write(tenant)
        yield built
    finally:
        for tenant in (built.acme, built.globex):
            built.admin.execute_command("ACL", "DELUSER", tenant.target.username)
            if keys := list(built.admin.scan_iter(match=f"{tenant.prefix}*")):
                built.admin.unlink(*keys)
        for client in built.clients:
            client.close()
        await built.backend.close()
        built.admin.close()


def pairs(reply: Any) -> dict[str, Any]:
    """RESP3 gives maps, RESP2 flat key/value lists."""
    if isinstance(reply, dict):
        return reply
    return {str(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


def denied(call: Callable[[], Any]) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        call()


async def converge(backend: RedisBackend, targets: list[RedisTarget]) -> list[str]:
    """The engine's Redis pass, reduced to ACLs: observe, compare with the canonical form, write on drift.
    Returns what was written, and why."""
    observed = await backend.observe([t.username for t in targets])
    written = []
    for target in targets:
        if why := acl_drift(target, observed[target.username], await backend.canonical_commands(target.read_only)):
            await backend.apply(target)
            written.append(f"{target.username}: {'; '.join(why)}")
    return written
