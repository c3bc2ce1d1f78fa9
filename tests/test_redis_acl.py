"""The tenant ACL is an allowlist: every command the running Redis knows is checked with ACL DRYRUN.

Tenant users are written by the real backend (RedisBackend.apply) on the devstack's
Redis; ACL DRYRUN asks Redis itself what a user may run, COMMAND GETKEYS which
arguments it takes for keys.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.redis import ObservedAcl, acl_drift, comparable_commands, password_hash
from dynabase.desired.redis_commands import (
    CONNECTION,
    READ_ONLY_WRITES,
    CommandSpec,
    KeySpec,
    TenantCommands,
    classify,
    decide,
    parse_command_info,
)
from dynabase.devstack.stack import free_port

from .conftest import Stack
from .redis_helpers import Tenants, converge, denied, new_tenant, pairs, raw_admin, two_tenants


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[Tenants]:
    async with two_tenants(stack.env["DYNABASE_REDIS_URL"]) as tenants:
        yield tenants


def leaf_names_from_docs(admin: redis.Redis) -> set[str]:
    """Every command and subcommand, from COMMAND DOCS (independent of the COMMAND INFO the backend reads)."""
    docs = admin.execute_command("COMMAND", "DOCS")
    if not isinstance(docs, dict):
        docs = {docs[i]: pairs(docs[i + 1]) for i in range(0, len(docs), 2)}
    names: set[str] = set()
    for name, doc in docs.items():
        subcommands = pairs(doc).get("subcommands") or {}
        names |= {str(sub).lower() for sub in (pairs(subcommands) if subcommands else {})} or {str(name).lower()}
    return names


def raw_key_specs(admin: redis.Redis) -> dict[str, tuple[int, list[dict[str, Any]]]]:
    """name -> (arity, key specs with their search details), subcommands included."""
    out: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    def walk(entries: list[Any]) -> None:
        for entry in entries:
            if entry[9]:
                walk(entry[9])
                continue
            specs = []
            for raw in entry[8]:
                spec = pairs(raw)
                specs.append({"begin": pairs(spec["begin_search"]), "find": pairs(spec["find_keys"])})
            out[str(entry[0]).lower()] = (int(entry[1]), specs)

    walk(admin.execute_command("COMMAND", "INFO"))
    return out


def filler_args(name: str, arity: int, token: Callable[[int], str]) -> list[str]:
    """The command's words, then arguments up to its arity (the minimum for a negative one)."""
    words = name.split("|")
    return words + [token(i) for i in range(len(words), max(abs(arity), len(words)))]


def keyed_examples(name: str, arity: int, specs: list[dict[str, Any]], token: Callable[[int], str]) -> Iterator[
        list[str]]:
    """Invocations whose keys the specs find (COMMAND GETKEYS confirms which): one per keyword spec, else one."""
    keywords = [s for s in specs if s["begin"]["type"] == "keyword"]
    for chosen in keywords or [None]:
        args = filler_args(name, arity, token)
        for spec in specs:
            if spec["begin"]["type"] == "keyword" and spec is not chosen:
                continue
            begin, find = pairs(spec["begin"]["spec"]), pairs(spec["find"]["spec"])
            start = int(begin.get("index", 0))
            if spec is chosen:  # the keyword at its search start, keys after it
                at = int(begin["startfrom"])
                at = at if at > 0 else len(args) + at
                args += [token(i) for i in range(len(args), at + 3)]
                args[at], start = str(begin["keyword"]), at + 1
            args += [token(i) for i in range(len(args), start + 1)]
            if spec["find"]["type"] == "keynum":  # one key
                count_at, first = start + int(find["keynumidx"]), start + int(find["firstkey"])
                args += [token(i) for i in range(len(args), first + 2)]
                args[count_at] = "1"
        yield args


async def test_every_command_is_allowed_with_key_specs_connection_scoped_or_denied(env: Tenants) -> None:
    admin, acme, globex = env.admin, env.acme, env.globex
    commands = parse_command_info(admin.execute_command("COMMAND", "INFO"))
    decisions = classify(commands)
    assert set(decisions) == leaf_names_from_docs(admin), "COMMAND INFO and COMMAND DOCS disagree"
    allowed = await env.backend.tenant_commands()
    assert set(allowed.allowed) == {n for n, d in decisions.items() if d.allowed}
    # Nothing by category and no bare container: a command or subcommand a newer Redis adds is denied.
    rules = allowed.rules(False)
    assert rules[0] == "-@all" and not [r for r in rules[1:] if not r.startswith("+") or "@" in r]
    containers = {c.name.split("|")[0] for c in commands if "|" in c.name}
    assert not [r for r in rules if r[1:] in containers]

    specs = raw_key_specs(admin)
    mine: Callable[[int], str] = lambda i: f"{acme.prefix}a{i}"  # noqa: E731
    theirs = f"{globex.prefix}x"
    user = acme.target.username
    kinds: dict[str, int] = {}
    problems: list[str] = []

    def dryrun(args: list[str]) -> str:
        return str(admin.execute_command("ACL", "DRYRUN", user, *args))

    for name, decision in sorted(decisions.items()):
        kinds[decision.kind] = kinds.get(decision.kind, 0) + 1
        arity, key_specs = specs[name]
        if not decision.allowed:
            reply = dryrun(filler_args(name, arity, mine))
            if reply != f"This user has no permissions to run the '{name}' command":
                problems.append(f"{name}: denied by the allowlist, but DRYRUN says {reply!r}")
            continue
        if decision.kind in ("keyed", "script") and key_specs:
            found = 0
            for args in keyed_examples(name, arity, key_specs, mine):
                try:
                    keys = [str(k) for k in admin.execute_command("COMMAND", "GETKEYS", *args)]
                except redis.exceptions.ResponseError as exc:
                    problems.append(f"{name} {args}: COMMAND GETKEYS says {exc}")
                    continue
                found += len(keys)
                if (reply := dryrun(args)) != "OK":
                    problems.append(f"{name} {args}: own keys refused: {reply!r}")
                for key in keys:
                    foreign = [theirs if a == key else a for a in args]
                    if dryrun(foreign) != f"This user has no permissions to access the '{theirs}' key":
                        problems.append(f"{name} {foreign}: another tenant's key is not refused")
            if not found:
                problems.append(f"{name}: no example invocation with a key; extend keyed_examples")
            continue
        args = filler_args(name, arity, mine)
        if name == "psubscribe":  # subscription patterns are compared literally with the tenant's pattern
            args = ["psubscribe", f"{acme.prefix}*"]
        if (reply := dryrun(args)) != "OK":
            problems.append(f"{name} {args}: allowed, but DRYRUN says {reply!r}")
        if name in ("publish", "subscribe", "psubscribe", "spublish", "ssubscribe"):
            foreign = [args[0], theirs if name != "psubscribe" else "*", *args[2:]]
            if "channel" not in dryrun(foreign):
                problems.append(f"{name} {foreign}: another tenant's channel is not refused")
    assert not problems, "\n".join(problems)
    assert kinds["keyed"] > 150 and kinds["connection"] >= 20 and kinds["channel"] == 8 and kinds["script"] == 6
    assert sum(kinds.values()) == len(decisions)


async def test_read_only_variant_keeps_only_reads_of_the_same_allowlist(env: Tenants) -> None:
    admin, acme = env.admin, env.acme
    await env.write(acme, read_only=True)
    commands = {c.name: c for c in parse_command_info(admin.execute_command("COMMAND", "INFO"))}
    allowed = await env.backend.tenant_commands()
    assert set(allowed.read_only) <= set(allowed.allowed)
    specs = raw_key_specs(admin)
    problems = []
    for name in allowed.allowed:
        arity, key_specs = specs[name]
        args = next(keyed_examples(name, arity, key_specs, lambda i: f"{acme.prefix}a{i}"), None) \
            or filler_args(name, arity, lambda i: f"{acme.prefix}a{i}")
        if name == "psubscribe":
            args = ["psubscribe", f"{acme.prefix}*"]
        reply = str(admin.execute_command("ACL", "DRYRUN", acme.target.username, *args))
        writes = "write" in commands[name].flags and name not in READ_ONLY_WRITES
        expected = f"This user has no permissions to run the '{name}' command" if writes else "OK"
        if reply != expected:
            problems.append(f"{name}: read-only user gets {reply!r}, expected {expected!r}")
    assert not problems, "\n".join(problems)
    assert {"get", "hgetall", "xrange", "eval", "del", "unlink"} <= set(allowed.read_only)
    assert not {"set", "hset", "xadd", "zadd", "expire"} & set(allowed.read_only)


def test_a_command_redis_cannot_confine_is_denied_by_construction() -> None:
    """What a newer Redis might add: without complete key specs it stays denied; HELP and the like too."""

    def spec(name: str, *key_specs: KeySpec, flags: tuple[str, ...] = (), cats: tuple[str, ...] = ()) -> CommandSpec:
        return CommandSpec(name, -2, frozenset(flags), frozenset(cats), key_specs)

    index_range = KeySpec(frozenset({"rw", "update"}), "index", "range")
    assert decide(spec("newkeyed", index_range)).kind == "keyed"
    assert not decide(spec("newglobal")).allowed
    assert not decide(spec("newpartial", KeySpec(frozenset({"rw", "incomplete"}), "keyword", "range"))).allowed
    assert not decide(spec("newunknown", KeySpec(frozenset({"ro"}), "unknown", "unknown"))).allowed
    assert not decide(spec("newvarflags", KeySpec(frozenset({"rw", "variable_flags"}), "index", "range"))).allowed
    assert not decide(spec("newchannel", KeySpec(frozenset({"not_key"}), "index", "range"))).allowed
    assert not decide(spec("newmodule", index_range, flags=("module",))).allowed
    assert not decide(spec("newadmin", index_range, flags=("admin",))).allowed
    assert not decide(spec("newdangerous", index_range, cats=("@dangerous",))).allowed
    assert not decide(spec("function|newthing", cats=("@scripting",))).allowed
    assert not decide(spec("fcall", index_range, cats=("@scripting",))).allowed
    assert not decide(spec("client|newthing")).allowed
    assert not decide(spec("move", index_range)).allowed
    rules = TenantCommands.from_server([spec("newkeyed", index_range), spec("newglobal"),
                                        spec("ping")]).rules(False)
    assert rules == ["-@all", "+newkeyed", "+ping"]
    assert "client|setinfo" in CONNECTION  # sent by client libraries on connect (Redis 7.2+)


# -- tenants attacking each other ------------------------------------------------------------


def acl_calls(admin: redis.Redis, command: str) -> int:
    return int((admin.info("commandstats").get(f"cmdstat_acl|{command}") or {}).get("calls", 0))


async def test_quiet_passes_write_nothing_in_either_variant_and_read_little(env: Tenants) -> None:
    await env.write(env.globex, read_only=True)
    targets = [env.acme.target, env.globex.target]
    assert await converge(env.backend, targets) == []
    getusers, setusers = acl_calls(env.admin, "getuser"), acl_calls(env.admin, "setuser")
    assert await converge(env.backend, targets) == []
    # Nobody else changed an ACL user since: no ACL GETUSER either (each costs Redis a millisecond or more).
    assert (acl_calls(env.admin, "getuser"), acl_calls(env.admin, "setuser")) == (getusers, setusers)
    env.admin.execute_command("ACL", "SETUSER", env.acme.target.username, "+keys")  # by hand
    assert len(await converge(env.backend, targets)) == 1
    denied(lambda: env.connect(env.acme).keys("*"))
    fresh = RedisBackend(env.url)
    try:  # another operator process: learns the same canonical form (from Redis), writes nothing
        assert await converge(fresh, targets) == []
    finally:
        await fresh.close()


class PrivateRedis:
    """A Redis of this test's own, with an aclfile, that the test restarts on the same port."""

    def __init__(self, base: Path) -> None:
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        aclfile = base / "users.acl"
        aclfile.write_text(f"user default on #{password_hash(self.password)} ~* &* +@all\n")
        self.conf = base / "redis.conf"
        self.conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {base}\naclfile {aclfile}\nsave \"\"\n"
                             "appendonly no\n")
        self.url = f"redis://default:{self.password}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is part of the devstack"
        self.process = subprocess.Popen([binary, str(self.conf)], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, retry_on_error=[redis.exceptions.ConnectionError],
                                      retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 200))
        assert client.ping()  # retries until the server listens
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_restarted_redis_is_relearned_and_a_quiet_pass_still_writes_nothing(
        private_redis: PrivateRedis) -> None:
    """Redis 7.0 lists a user's commands in an order that changes with each server process."""
    tenant = new_tenant("restart")
    backend = RedisBackend(private_redis.url)
    try:
        assert len(await converge(backend, [tenant.target])) == 1
        await backend.persist()  # ACL SAVE to the aclfile
        assert await converge(backend, [tenant.target]) == []
        private_redis.stop()
        private_redis.start()  # the user comes back from the aclfile, its commands listed anew
        assert await converge(backend, [tenant.target]) == []
        assert await converge(backend, [tenant.target]) == []
        client = redis.Redis(host="127.0.0.1", port=private_redis.port, username=tenant.target.username,
                             password=tenant.password, decode_responses=True)
        assert client.set(f"{tenant.prefix}k", "v") and client.get(f"{tenant.prefix}k") == "v"
        denied(lambda: client.execute_command("DBSIZE"))
        client.close()
    finally:
        await backend.close()


async def test_a_quiet_pass_writes_nothing_after_redis_reorders_its_command_table(
        private_redis: PrivateRedis) -> None:
    """Redis 7.0 lists single-command rules in its command dict's order, which moves as the dict rehashes
    (command lookups drive that): the same rights must still compare equal."""
    tenant = new_tenant("reorder")
    backend = RedisBackend(private_redis.url)
    admin = raw_admin(private_redis.url)
    try:
        assert len(await converge(backend, [tenant.target])) == 1
        before = pairs(admin.execute_command("ACL", "GETUSER", tenant.target.username))["commands"]
        for name in admin.execute_command("COMMAND", "LIST"):
            admin.execute_command("COMMAND", "INFO", name)
        after = pairs(admin.execute_command("ACL", "GETUSER", tenant.target.username))["commands"]
        if str(admin.info("server")["redis_version"]).startswith("7.0."):
            assert after != before and sorted(after.split()) == sorted(before.split())  # the premise
        admin.execute_command("ACL", "SETUSER", "someone_else", "off")  # so the users are read again
        assert await converge(backend, [tenant.target]) == []
    finally:
        admin.close()
        await backend.close()


def test_comparable_commands_keep_categories_in_order_and_sort_single_commands() -> None:
    assert comparable_commands("-@all +@string +@hash -move +eval +client|id") == \
        comparable_commands("-@all +@string +@hash +client|id -move +eval")
    assert comparable_commands("-@all +@hash +@string -move") != comparable_commands("-@all +@string +@hash -move")
    assert comparable_commands("-@all +get +set") != comparable_commands("-@all +get -set")


def test_drift_names_what_differs_in_a_few_words() -> None:
    tenant = new_tenant("drift")
    wanted = "-@all +get +set +hset +xadd"
    observed = ObservedAcl(("on",), (tenant.target.password_sha256,), "+@all -keys", f"~{tenant.prefix}*",
                           f"&{tenant.prefix}*")
    assert acl_drift(tenant.target, observed, wanted) == [
        "commands differ from the allowlist (has +@all -keys; lacks -@all +get +set and 2 more)"]
    assert acl_drift(tenant.target, replace(observed, commands=wanted), wanted) == []


async def test_operators_probing_at_once_each_learn_their_own_canonical_form(private_redis: PrivateRedis) -> None:
    """Two operator processes on a fresh Redis probe the read-write and read-only rules at the same moment."""
    first, second = RedisBackend(private_redis.url), RedisBackend(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        expected = (await first.canonical_commands(False), await first.canonical_commands(True))
        assert expected[0] != expected[1]
        for _ in range(10):
            admin.unlink(*admin.keys("dynabase:redis:acl-canonical:*"))
            first.forget_commands()
            second.forget_commands()
            got = await asyncio.gather(first.canonical_commands(False), second.canonical_commands(True))
            assert tuple(got) == expected
        assert not [u for u in admin.acl_users() if u.startswith("dynabase_probe")]
    finally:
        admin.close()
        await first.close()
        await second.close()
