"""Where the engine keeps what it does not declare: tenant passwords and status.

The operator keeps them in Kubernetes (Secrets, the status subresource); headless
mode takes passwords from variables, else from Postgres (encrypted,
backends/secrets_pg.py) or files, and status from Postgres; tests use the
in-memory versions. The engine sees only these protocols.

A stored password is never replaced: `create_password` keeps the first one
written, and the engine generates one only for a role that has no password yet.
When a role has a password but no store knows it, the tenant reports
SecretMissing with the store's `restore_hint`.
"""

from __future__ import annotations

import os
import re
import secrets as _secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from dynabase.settings import secret_from_env
from dynabase.spec import TenantDatabase, TenantDatabaseStatus


def generate_password() -> str:
    return _secrets.token_urlsafe(24)


class SecretStore(Protocol):
    async def get_password(self, tenant: TenantDatabase) -> str | None: ...

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        """Store a generated password; returns the one that is stored (another writer may have won)."""
        ...

    def restore_hint(self, tenant: TenantDatabase) -> str:
        """How a person gives back the password of a role whose secret is lost (no secret in it)."""
        ...


@runtime_checkable
class BulkSecretStore(Protocol):
    """A store that reads many tenants' passwords in a few requests (Kubernetes: a LIST per namespace)."""

    async def get_passwords(self, tenants: Sequence[TenantDatabase]) -> dict[str, str | None]:
        """By tenant key; a tenant missing from the answer is read with ``get_password``."""
        ...


class StatusStore(Protocol):
    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]: ...

    async def save(self, key: str, status: TenantDatabaseStatus) -> None: ...


class MemorySecretStore:
    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        return self.passwords.get(tenant.key)

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        return self.passwords.setdefault(tenant.key, password)

    def restore_hint(self, tenant: TenantDatabase) -> str:
        return "this engine keeps passwords in memory only"


def _slug(tenant: TenantDatabase) -> str:
    return f"{tenant.namespace}__{tenant.name}"


def password_variable(tenant: TenantDatabase) -> str:
    """``DYNABASE_PASSWORD_<NAMESPACE>__<NAME>``, upper case, other characters as ``_``."""
    return "DYNABASE_PASSWORD_" + re.sub(r"[^A-Z0-9_]", "_", _slug(tenant).upper())


class EnvironmentPasswords:
    """Passwords given as variables win over the store beneath (a Railway variable, a restored password).

    ``DYNABASE_PASSWORD_<NAMESPACE>__<NAME>`` (or ``…_FILE``); generated passwords go to ``store``.
    """

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        return secret_from_env(password_variable(tenant)) or await self.store.get_password(tenant)

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        return await self.store.create_password(tenant, password)

    def restore_hint(self, tenant: TenantDatabase) -> str:
        return f"set {password_variable(tenant)} to the role's password, or {self.store.restore_hint(tenant)}"


class DirectorySecretStore:
    """One 0600 file per tenant (``<namespace>__<name>``), like a mounted Secret volume.

    Only the replica and the filesystem that wrote a file know it: for one
    replica with a persistent volume.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        path = self.directory / _slug(tenant)
        return path.read_text().strip() if path.exists() else None

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / _slug(tenant)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()  # someone else generated it first: use theirs
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        return password

    def restore_hint(self, tenant: TenantDatabase) -> str:
        return f"restore the file {self.directory / _slug(tenant)}"


class MemoryStatusStore:
    def __init__(self) -> None:
        self.statuses: dict[str, TenantDatabaseStatus] = {}
        self.writes = 0

    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        return {k: self.statuses[k] for k in keys if k in self.statuses}

    async def save(self, key: str, status: TenantDatabaseStatus) -> None:
        self.writes += 1
        self.statuses[key] = status
