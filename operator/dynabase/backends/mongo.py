"""MongoDB backend: a SCRAM user per tenant with readWrite on its own database,
the `dynabase.organizations` records, and hourly `dynabase.tenantUsage` rollups.

FerretDB (the devstack's MongoDB) implements users but not roles: detected from
buildInfo, users are created without roles and the condition says
RolesUnsupported instead of pretending isolation exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from dynabase.desired.mongo import ORG_DB, ORGS, USAGE, org_changed, rollup
from dynabase.keyspace import decode_usage


@dataclass
class MongoUser:
    exists: bool
    roles: list[dict[str, str]]
    scram: dict[str, Any] | None = None  # SCRAM-SHA-256 credentials, to check a password locally


def scram_sha256_matches(credentials: dict[str, Any], password: str) -> bool:
    """MongoDB's SCRAM-SHA-256 record (salt, iterationCount, storedKey, serverKey) against a password."""
    import base64
    import hmac

    try:
        salt = base64.b64decode(credentials["salt"])
        iterations = int(credentials["iterationCount"])
        stored = base64.b64decode(credentials["storedKey"])
    except (KeyError, ValueError, TypeError):
        return False
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored)


class MongoBackend:
    name = "mongo"

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000)
        self.roles_supported: bool | None = None
        self.writes = 0
        self._verified: set[bytes] = set()

    async def close(self) -> None:
        await self.client.close()

    async def detect(self) -> bool:
        if self.roles_supported is None:
            info = await self.client.admin.command("buildInfo")
            self.roles_supported = "ferretdbVersion" not in info
        return self.roles_supported

    async def user(self, database: str, username: str) -> MongoUser:
        reply = await self.client[database].command({"usersInfo": username, "showCredentials": True})
        users = reply.get("users", [])
        if not users:
            return MongoUser(False, [])
        roles = [{"role": r["role"], "db": r["db"]} for r in users[0].get("roles", [])]
        return MongoUser(True, roles, (users[0].get("credentials") or {}).get("SCRAM-SHA-256"))

    async def password_ok(self, database: str, username: str, password: str, scram: dict[str, Any] | None) -> bool:
        """Compare with the stored SCRAM credentials (PBKDF2, no login); remembered after a match."""
        key = hashlib.sha256(f"{database}\0{username}\0{password}\0{scram}".encode()).digest()
        if key in self._verified:
            return True
        if scram:
            ok = scram_sha256_matches(scram, password)
            if ok:
                self._verified.add(key)
            return ok
        probe: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.url, username=username, password=password, authSource=database,
            authMechanism="SCRAM-SHA-256", serverSelectionTimeoutMS=5000,
        )
        try:
            await probe[database].command("ping")
        except OperationFailure:
            return False
        finally:
            await probe.close()
        self._verified.add(key)
        return True

    async def ensure_user(self, database: str, username: str, password: str, roles: list[dict[str, str]],
                          current: MongoUser) -> list[str]:
        """Create or correct the user; returns what was done (empty: nothing)."""
        db = self.client[database]
        if not current.exists:
            await db.command("createUser", username, pwd=password, roles=roles, mechanisms=["SCRAM-SHA-256"])
            self.writes += 1
            return ["createUser"]
        done = []
        if current.roles != roles and self.roles_supported:
            await db.command("updateUser", username, roles=roles)
            done.append("roles")
        if not await self.password_ok(database, username, password, current.scram):
            await db.command("updateUser", username, pwd=password)
            done.append("password")
        self.writes += len(done)
        return done

    async def drop_user(self, database: str, username: str, *, drop_database: bool) -> None:
        db = self.client[database]
        try:
            await db.command("dropUser", username)
        except OperationFailure as exc:
            if exc.code != 11:  # UserNotFound
                raise
        if drop_database:
            await self.client.drop_database(database)
        self.writes += 1

    async def orgs(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        cursor = self.client[ORG_DB][ORGS].find({"_id": {"$in": keys}})
        return {doc["_id"]: doc async for doc in cursor}

    async def upsert_org(self, doc: dict[str, Any], current: dict[str, Any] | None) -> bool:
        if not org_changed(current, doc):
            return False
        await self.client[ORG_DB][ORGS].replace_one(
            {"_id": doc["_id"]}, {**doc, "updatedAt": dt.datetime.now(dt.UTC)}, upsert=True
        )
        self.writes += 1
        return True

    async def delete_org(self, key: str) -> None:
        await self.client[ORG_DB][ORGS].delete_one({"_id": key})

    async def read_usage(self, hours: range) -> list[dict[str, Any]]:
        """The tenantUsage documents of these hours (one per tenant and hour)."""
        cursor = self.client[ORG_DB][USAGE].find({"hour": {"$gte": hours.start, "$lt": hours.stop}})
        return [doc async for doc in cursor]

    async def write_usage(self, hour: int, fields: dict[str, str]) -> int:
        """Idempotent: each document is replaced by the sum of absolute counters, so retries never add up."""
        docs = rollup(hour, decode_usage(fields))
        for doc in docs.values():
            await self.client[ORG_DB][USAGE].replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return len(docs)
