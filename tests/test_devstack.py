"""Every devstack service answers a real client."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import asyncpg
import pytest
import redis

from dynabase.devstack.stack import PGBOUNCER_ADMIN, resolve_services

from .conftest import Stack


async def test_postgres_answers_asyncpg(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.env["DYNABASE_POSTGRES_DSN"])
    try:
        assert (await conn.fetchval("SHOW password_encryption")) == "scram-sha-256"
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def test_postgres_answers_psql(stack: Stack) -> None:
    out = subprocess.run(
        ["psql", "-tAc", "SELECT current_user"], env={**stack.env, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "postgres"


async def test_pgbouncer_admin_console_answers(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.env["DYNABASE_PGBOUNCER_ADMIN_DSN"], statement_cache_size=0)
    try:
        # The admin console speaks only the simple protocol: execute(), not fetch().
        assert await conn.execute("SHOW VERSION") == "SHOW"
    finally:
        await conn.close()


def test_pgbouncer_console_via_psql(stack: Stack) -> None:
    dsn = stack.env["DYNABASE_PGBOUNCER_ADMIN_DSN"]
    out = subprocess.run(["psql", dsn, "-tAc", "SHOW VERSION"], capture_output=True, text=True, check=True)
    assert "PgBouncer" in out.stdout
    bad = subprocess.run(
        ["psql", dsn.replace(f"{PGBOUNCER_ADMIN}:", f"{PGBOUNCER_ADMIN}:wrong"), "-tAc", "SHOW VERSION"],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode != 0 and "authentication failed" in bad.stderr


def test_pgbouncer_userlist_holds_no_plaintext(stack: Stack) -> None:
    secrets = json.loads((stack.devstack.root / "state.json").read_text())["secrets"]
    userlist = (Path(stack.env["DYNABASE_PGBOUNCER_DIR"]) / "userlist.txt").read_text()
    assert "SCRAM-SHA-256$" in userlist
    assert secrets["pgbouncer_admin"] not in userlist


def test_redis_answers_and_requires_auth(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env["DYNABASE_REDIS_URL"])
    assert client.ping()
    anonymous = redis.Redis(port=client.connection_pool.connection_kwargs["port"])
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()


@pytest.mark.mongo
def test_ferretdb_answers_pymongo_with_scram(stack: Stack) -> None:
    stack.need("ferretdb")
    import pymongo
    from pymongo.errors import OperationFailure

    client = pymongo.MongoClient(stack.env["DYNABASE_MONGO_URL"], serverSelectionTimeoutMS=5000)
    client.devstack_check.items.insert_one({"n": 1})
    assert client.devstack_check.items.count_documents({"n": 1}) == 1
    user_and_password, rest = stack.env["DYNABASE_MONGO_URL"].removeprefix("mongodb://").split("@", 1)
    user = user_and_password.split(":", 1)[0]
    wrong = pymongo.MongoClient(f"mongodb://{user}:not-the-password@{rest}", serverSelectionTimeoutMS=3000)
    with pytest.raises(OperationFailure):
        wrong.admin.command("ping")


@pytest.mark.kube
def test_kube_apiserver_answers_kubectl(stack: Stack) -> None:
    out = stack.kubectl("version", "-o", "json").stdout
    assert json.loads(out)["serverVersion"]["gitVersion"].startswith("v1.34.")
    assert "default" in stack.kubectl("get", "namespaces", "-o", "name").stdout


def test_service_selection_adds_dependencies() -> None:
    assert resolve_services("pgbouncer", None) == ["postgres", "redis", "pgbouncer"]
    assert resolve_services(None, "kube,mongo") == ["postgres", "redis", "pgbouncer"]


def test_processes_end_after_down(tmp_path: Path) -> None:
    from dynabase.devstack.stack import Devstack

    stack = Devstack(tmp_path / "s")
    state = stack.up(["redis"])
    pid = state.services["redis"].pid
    stack.down()
    assert not Devstack._alive(pid)
