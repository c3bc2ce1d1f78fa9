"""Tenant passwords kept in Postgres, encrypted: where every headless replica and every redeploy finds them.

Each password is sealed with AES-256-GCM under the key of ``DYNABASE_SECRETS_KEY``
(or ``DYNABASE_SECRETS_KEY_FILE``): 32 random bytes, base64, e.g. from
``openssl rand -base64 32``. The row keeps the key's id, a fresh 96-bit nonce
and the ciphertext; the tenant's key is the associated data, so a row copied to
another tenant does not decrypt. The variable may list several keys separated
by commas: the first seals new passwords, every one opens rows it sealed, and a
row sealed by an older key is sealed again with the first when read (rotation).

Creation is race-free between replicas: ``INSERT … ON CONFLICT DO NOTHING``
and, when another writer got there first, its row is read back and used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dynabase.settings import SettingsError
from dynabase.spec import TenantDatabase

from .platform_schema import create_once, table_exists

KEY_VARIABLE = "DYNABASE_SECRETS_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
_TABLE = "dynabase.tenant_secrets"
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS dynabase;
CREATE TABLE IF NOT EXISTS dynabase.tenant_secrets (
    tenant_key text PRIMARY KEY,
    key_id text NOT NULL,
    sealed bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON dynabase.tenant_secrets FROM PUBLIC;
"""


class SecretUnreadable(RuntimeError):
    """A stored password that this key cannot open; the message says which key is needed, never a secret."""


def key_id(key: bytes) -> str:
    """A short public name for a key, so a row says which key sealed it without revealing it."""
    return hashlib.sha256(b"dynabase secrets key id\0" + key).hexdigest()[:16]


class SecretsKeyring:
    """The keys from the variable: the first seals, every one opens."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) != KEY_BYTES for k in keys):
            raise ValueError(f"a keyring needs keys of {KEY_BYTES} bytes")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.primary_id = key_id(keys[0])

    def __repr__(self) -> str:
        return f"SecretsKeyring(ids={list(self._keys)})"

    @classmethod
    def parse(cls, text: str, variable: str = KEY_VARIABLE) -> SecretsKeyring:
        """Base64 keys separated by commas; the error names the variable and the key's position, not the key."""
        keys = []
        for position, word in enumerate((w.strip() for w in text.split(",")), start=1):
            keys.append(_decode_key(word, variable, position))
        return cls(keys)

    def seal(self, tenant_key: str, password: str) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.primary_id].encrypt(nonce, password.encode(), _associated(tenant_key))
        return self.primary_id, nonce + sealed

    def open(self, tenant_key: str, sealed_by: str, sealed: bytes) -> str:
        aead = self._keys.get(sealed_by)
        if aead is None:
            raise SecretUnreadable(
                f"the password of {tenant_key} was sealed with key {sealed_by}, which {KEY_VARIABLE} does not "
                f"hold (it holds {', '.join(self._keys)}): add that key after the current one, comma separated")
        try:
            return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated(tenant_key)).decode()
        except (InvalidTag, UnicodeDecodeError):
            raise SecretUnreadable(f"the stored password of {tenant_key} does not open with key {sealed_by}: "
                                   "the row was altered or copied from another tenant") from None


def _associated(tenant_key: str) -> bytes:
    return b"dynabase tenant password\0" + tenant_key.encode()


def _decode_key(word: str, variable: str, position: int) -> bytes:
    fix = f"make one with `openssl rand -base64 {KEY_BYTES}`"
    if not word:
        raise SettingsError(f"{variable}: key {position} is empty; {fix}")
    try:
        padded = word + "=" * (-len(word) % 4)
        key = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(f"{variable}: key {position} is not base64 ({len(word)} characters); {fix}") from None
    if len(key) != KEY_BYTES:
        raise SettingsError(f"{variable}: key {position} decodes to {len(key)} bytes, not {KEY_BYTES}; {fix}")
    return key


class PostgresSecretStore:
    """Sealed passwords in ``dynabase.tenant_secrets``. A password once stored never changes, so it is cached."""

    def __init__(self, pool: asyncpg.Pool, keyring: SecretsKeyring, *, reseal: bool = True) -> None:
        self._pool = pool
        self._keyring = keyring
        self._reseal = reseal  # False for `dynabase plan`, which writes nothing
        self._ready = False
        self._known: dict[str, str] = {}
        self._sealed: dict[str, tuple[str, bytes]] | None = None  # every row, read once (one query per process)

    async def get_password(self, tenant: TenantDatabase) -> str | None:
        key = tenant.key
        if key in self._known:
            return self._known[key]
        async with self._pool.acquire() as conn:
            first = self._sealed is None
            if self._sealed is None:
                self._sealed = await self._read(conn, None)
            row = self._sealed.pop(key, None)
            if row is None and not first:  # perhaps written by another replica since
                row = (await self._read(conn, key)).get(key)
            if row is None:
                return None
            return await self._open(conn, key, *row)

    async def create_password(self, tenant: TenantDatabase, password: str) -> str:
        await self._ensure()
        key = tenant.key
        sealed_by, sealed = self._keyring.seal(key, password)
        async with self._pool.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO dynabase.tenant_secrets (tenant_key, key_id, sealed) VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant_key) DO NOTHING RETURNING true", key, sealed_by, sealed)
            if inserted:
                self._known[key] = password
                return password
            row = (await self._read(conn, key)).get(key)  # another replica stored one first: theirs wins
            if row is None:
                raise SecretUnreadable(f"the password row of {key} vanished while it was created; the next "
                                       "pass retries")
            return await self._open(conn, key, *row)

    def restore_hint(self, tenant: TenantDatabase) -> str:
        return (f"restore its row in {_TABLE} (a database backup) with the {KEY_VARIABLE} that sealed it "
                f"(this one is {self._keyring.primary_id})")

    async def _ensure(self) -> None:
        if not self._ready:
            await create_once(self._pool, _TABLE, _SCHEMA)
            self._ready = True

    @staticmethod
    async def _read(conn: asyncpg.Connection, key: str | None) -> dict[str, tuple[str, bytes]]:
        # Reading never creates the table, so `dynabase plan` stays read-only.
        if not await table_exists(conn, _TABLE):
            return {}
        if key is None:
            rows = await conn.fetch("SELECT tenant_key, key_id, sealed FROM dynabase.tenant_secrets")
        else:
            rows = await conn.fetch("SELECT tenant_key, key_id, sealed FROM dynabase.tenant_secrets "
                                    "WHERE tenant_key = $1", key)
        return {r["tenant_key"]: (r["key_id"], bytes(r["sealed"])) for r in rows}

    async def _open(self, conn: asyncpg.Connection, key: str, sealed_by: str, sealed: bytes) -> str:
        password = self._keyring.open(key, sealed_by, sealed)
        if sealed_by != self._keyring.primary_id and self._reseal:
            # Rotation: seal it again with the current key; only if no one else did meanwhile.
            new_id, resealed = self._keyring.seal(key, password)
            await conn.execute("UPDATE dynabase.tenant_secrets SET key_id = $2, sealed = $3 "
                               "WHERE tenant_key = $1 AND key_id = $4", key, new_id, resealed, sealed_by)
        self._known[key] = password
        return password
