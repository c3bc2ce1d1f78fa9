"""Where the engine keeps what it does not declare: tenant passwords and status.

The operator keeps them in Kubernetes (Secrets, the status subresource), headless
mode in files/environment and Postgres; tests use the in-memory versions. The
engine sees only these protocols.
"""

from __future__ import annotations

import os
import re
import secrets as _secrets
from pathlib import Path
from typing import Protocol

from dynabase.spec import TenantDatabase, TenantDatabaseStatus


def generate_password() -> str:
    return _secrets.token_urlsafe(24)


class SecretStore(Protocol):
    async def get_password(self, tenant: TenantDatabase) -> str | None: ...

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        """Store a generated password; returns the one that is stored (another writer may have won)."""
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


class DirectorySecretStore:
    """One 0600 file per tenant (``<namespace>__<name>``), like a mounted Secret volume.

    ``DYNABASE_PASSWORD_<NAMESPACE>__<NAME>`` in the environment wins, so a
    Railway variable can provide a password without a file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def _slug(tenant: TenantDatabase) -> str:
        return f"{tenant.namespace}__{tenant.name}"

    def _env_name(self, tenant: TenantDatabase) -> str:
        return "DYNABASE_PASSWORD_" + re.sub(r"[^A-Z0-9_]", "_", self._slug(tenant).upper())

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        from_env = os.environ.get(self._env_name(tenant))
        if from_env:
            return from_env
        path = self.directory / self._slug(tenant)
        return path.read_text().strip() if path.exists() else None

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / self._slug(tenant)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()  # someone else generated it first: use theirs
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        return password


class MemoryStatusStore:
    def __init__(self) -> None:
        self.statuses: dict[str, TenantDatabaseStatus] = {}
        self.writes = 0

    async def load(self, keys: list[str]) -> dict[str, TenantDatabaseStatus]:
        return {k: self.statuses[k] for k in keys if k in self.statuses}

    async def save(self, key: str, status: TenantDatabaseStatus) -> None:
        self.writes += 1
        self.statuses[key] = status
