"""Tenant ACLs are an allowlist: every command the running Redis knows is checked, and tenants attack each other.

Tenant users are written by the real backend (RedisBackend.apply) on the devstack's
Redis; ACL DRYRUN asks Redis itself what a user may run.
"""

from __future__ import annotations

import secrets as pysecrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dynabase.backends.redis_acl import RedisBackend
from dynabase.desired.redis import RedisTarget, acl_drift, password_hash
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
from .engine_helpers import unique

NoPermission = redis.exceptions.NoPermissionError


@dataclass
class Tenant:
    database: str
    password: str
    target: RedisTarget

    @property
    def prefix(self) -> str:
        return f"t:{self.database}:"


@dataclass
class Env:
    backend: RedisBackend
    admin: redis.Redis
    port: int
    acme: Tenant
    globex: Tenant

    def connect(self, tenant: Tenant) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=tenant.target.username,
                           password=tenant.password, decode_responses=True)

    async def write(self, tenant: Tenant, *, read_only: bool = False) -> None:
        tenant.target = RedisTarget(tenant.database, tenant.database, tenant.target.password_sha256, read_only)
        await self.backend.apply(tenant.target)


def raw_admin(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set_response_callback("COMMAND", lambda response, **kwargs: response)
    return client


def new_tenant(name: str) -> Tenant:
    database, password = unique(name), pysecrets.token_urlsafe(12)
    return Tenant(database, password, RedisTarget(database, database, password_hash(password), False))


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[Env]:
    url = stack.env["DYNABASE_REDIS_URL"]
    backend = RedisBackend(url)
    admin = raw_admin(url)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    built = Env(backend, admin, port, new_tenant("acme"), new_tenant("globex"))
    try:
        for tenant in (built.acme, built.globex):
            await built.write(tenant)
        yield built
    finally:
        for tenant in (built.acme, built.globex):
            admin.execute_command("ACL", "DELUSER", tenant.target.username)
        await backend.close()
        admin.close()


# -- every command the server knows --------------------------------------------------------


def leaf_names_from_docs(admin: redis.Redis) -> set[str]:
    """Every command and subcommand, from COMMAND DOCS (independent of the COMMAND INFO the backend reads)."""
    docs = admin.execute_command("COMMAND", "DOCS")
    if not isinstance(docs, dict):
        docs = {docs[i]: _pairs(docs[i + 1]) for i in range(0, len(docs), 2)}
    names: set[str] = set()
    for name, doc in docs.items():
        subcommands = _pairs(doc).get("subcommands") or {}
        names |= {str(sub).lower() for sub in (_pairs(subcommands) if subcommands else {})} or {str(name).lower()}
    return names


def _pairs(reply: Any) -> dict[str, Any]:
    if isinstance(reply, dict):
        return reply
    return {str(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


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
                spec = _pairs(raw)
                specs.append({"begin": _pairs(spec["begin_search"]), "find": _pairs(spec["find_keys"])})
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
            begin, find = _pairs(spec["begin"]["spec"]), _pairs(spec["find"]["spec"])
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


async def test_every_command_is_allowed_with_key_specs_connection_scoped_or_denied(env: Env) -> None:
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


async def test_read_only_variant_keeps_only_reads_of_the_same_allowlist(env: Env) -> None:
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


LIBRARY = """#!lua name={name}
redis.register_function('{name}_get', function(keys, args) return redis.call('GET', keys[1]) end)
"""


@pytest.fixture
def globex_library(env: Env) -> Iterator[str]:
    """A function library loaded on globex's behalf (tenants cannot load one themselves)."""
    name = env.globex.database
    env.admin.execute_command("FUNCTION", "LOAD", LIBRARY.format(name=name))
    yield name
    env.admin.execute_command("FUNCTION", "DELETE", name)


def denied(call: Callable[[], Any]) -> None:
    with pytest.raises(NoPermission):
        call()


def library_names(admin: redis.Redis) -> set[str]:
    return {str(_pairs(lib)["library_name"]) for lib in admin.execute_command("FUNCTION", "LIST")}


async def test_functions_are_out_of_every_tenants_reach(env: Env, globex_library: str) -> None:
    acme = env.connect(env.acme)
    attacks = [("FUNCTION", "DELETE", globex_library), ("FUNCTION", "FLUSH"), ("FUNCTION", "FLUSH", "ASYNC"),
               ("FUNCTION", "DUMP"), ("FUNCTION", "LIST"), ("FUNCTION", "LIST", "WITHCODE"),
               ("FUNCTION", "LOAD", "REPLACE", LIBRARY.format(name=globex_library)),
               ("FUNCTION", "LOAD", LIBRARY.format(name=env.acme.database)), ("FUNCTION", "KILL"),
               ("FUNCTION", "STATS"), ("FUNCTION", "RESTORE", "x", "FLUSH"),
               ("FCALL", f"{globex_library}_get", "1", f"{env.acme.prefix}k"),
               ("FCALL_RO", f"{globex_library}_get", "1", f"{env.acme.prefix}k")]
    for attack in attacks:
        denied(lambda attack=attack: acme.execute_command(*attack))  # type: ignore[misc]
    assert globex_library in library_names(env.admin)
    assert env.acme.database not in library_names(env.admin)


async def test_script_cache_survives_other_tenants_and_scripts_touch_only_own_keys(env: Env) -> None:
    acme, globex = env.connect(env.acme), env.connect(env.globex)
    globex.set(f"{env.globex.prefix}k", "globex's")
    sha = globex.script_load("return redis.call('GET', KEYS[1])")
    assert globex.evalsha(sha, 1, f"{env.globex.prefix}k") == "globex's"
    denied(lambda: acme.script_flush())
    denied(lambda: acme.execute_command("SCRIPT", "FLUSH", "SYNC"))
    denied(lambda: acme.script_kill())
    denied(lambda: acme.execute_command("SCRIPT", "DEBUG", "YES"))
    assert globex.evalsha(sha, 1, f"{env.globex.prefix}k") == "globex's"  # still cached
    assert acme.script_exists(sha) == [True]  # the cache is content-addressed: same as EVALSHA answering
    # The same script, run by acme: every key it touches is checked against acme's ACL.
    denied(lambda: acme.evalsha(sha, 1, f"{env.globex.prefix}k"))
    with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
        acme.eval(f"return redis.call('GET', '{env.globex.prefix}k')", 0)  # an undeclared key: still checked
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        acme.eval("return redis.call('FLUSHALL')", 0)
    assert globex.get(f"{env.globex.prefix}k") == "globex's"


async def test_server_wide_state_is_denied(env: Env) -> None:
    acme = env.connect(env.acme)
    platform = env.admin.pubsub()
    platform.subscribe("dynabase:proxy:limits:changed")
    try:
        platform.get_message(timeout=5)  # the subscription is confirmed
        attacks = [("MEMORY", "PURGE"), ("MEMORY", "STATS"), ("MEMORY", "DOCTOR"), ("MEMORY", "MALLOC-STATS"),
                   ("PUBSUB", "CHANNELS", "*"), ("PUBSUB", "NUMSUB", "dynabase:proxy:limits:changed"),
                   ("PUBSUB", "NUMPAT"), ("PUBSUB", "SHARDCHANNELS"), ("PUBSUB", "SHARDNUMSUB", "x"),
                   ("DBSIZE",), ("INFO",), ("INFO", "keyspace"), ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",),
                   ("SELECT", "1"), ("SWAPDB", "0", "1"), ("FLUSHDB",), ("FLUSHALL",), ("CLIENT", "LIST"),
                   ("CLIENT", "KILL", "ID", "1"), ("CLIENT", "TRACKING", "ON", "BCAST"), ("CLIENT", "PAUSE", "1"),
                   ("CONFIG", "GET", "*"), ("ACL", "LIST"), ("MONITOR",), ("SLOWLOG", "GET"), ("LASTSAVE",),
                   ("MOVE", f"{env.acme.prefix}k", "1"), ("COPY", f"{env.acme.prefix}k", f"{env.acme.prefix}j",
                                                          "DB", "1"),
                   ("SORT", f"{env.acme.prefix}l", "BY", f"{env.globex.prefix}*"), ("OBJECT", "HELP")]
        for attack in attacks:
            denied(lambda attack=attack: acme.execute_command(*attack))  # type: ignore[misc]
    finally:
        platform.close()


async def test_a_tenant_works_freely_within_its_own_keys_and_channels(env: Env) -> None:
    acme, globex = env.connect(env.acme), env.connect(env.globex)
    mine, theirs = env.acme.prefix, env.globex.prefix
    globex.set(f"{theirs}k", "globex's")
    assert acme.set(f"{mine}k", "v") and acme.get(f"{mine}k") == "v"
    assert acme.hset(f"{mine}h", "f", "1") == 1 and acme.hgetall(f"{mine}h") == {"f": "1"}
    assert acme.xadd(f"{mine}s", {"f": "1"}) and acme.xlen(f"{mine}s") == 1
    assert acme.zadd(f"{mine}z", {"m": 1}) == 1 and acme.zrange(f"{mine}z", 0, -1) == ["m"]
    assert acme.eval("return redis.call('INCR', KEYS[1])", 1, f"{mine}n") == 1
    assert acme.memory_usage(f"{mine}k") is not None
    pipe = acme.pipeline(transaction=True)
    pipe.set(f"{mine}t", "1").incr(f"{mine}t")
    assert pipe.execute() == [True, 2]
    assert acme.client_setname("acme-worker") and acme.client_getname() == "acme-worker"
    assert acme.ping() and acme.time()
    for attack in [lambda: acme.get(f"{theirs}k"), lambda: acme.set(f"{theirs}k", "x"),
                   lambda: acme.delete(f"{theirs}k"), lambda: acme.rename(f"{mine}k", f"{theirs}k"),
                   lambda: acme.execute_command("OBJECT", "ENCODING", f"{theirs}k"),
                   lambda: acme.memory_usage(f"{theirs}k"),
                   lambda: acme.eval("return redis.call('GET', KEYS[1])", 1, f"{theirs}k"),
                   lambda: acme.xread({f"{theirs}s": "0"}), lambda: acme.execute_command("WATCH", f"{theirs}k")]:
        denied(attack)
    assert globex.get(f"{theirs}k") == "globex's"


async def test_pubsub_reaches_own_channels_only(env: Env) -> None:
    acme, globex = env.connect(env.acme), env.connect(env.globex)
    listener = acme.pubsub()
    try:
        listener.subscribe(f"{env.acme.prefix}news")
        listener.psubscribe(f"{env.acme.prefix}*")
        assert [listener.get_message(timeout=5)["type"] for _ in range(2)] == ["subscribe", "psubscribe"]
        assert acme.publish(f"{env.acme.prefix}news", "hello") == 2
        got = [listener.get_message(timeout=5) for _ in range(2)]
        assert {(m["type"], m["data"]) for m in got} == {("message", "hello"), ("pmessage", "hello")}
    finally:
        listener.close()
    denied(lambda: acme.publish(f"{env.globex.prefix}news", "spoof"))
    denied(lambda: acme.publish("dynabase:proxy:limits:changed", "spoof"))
    denied(lambda: globex.publish(f"{env.acme.prefix}news", "spoof"))
    attempts = [("subscribe", f"{env.globex.prefix}news"), ("subscribe", "dynabase:proxy:limits:changed"),
                ("subscribe", "__keyspace@0__:x"), ("ssubscribe", f"{env.globex.prefix}news"),
                ("psubscribe", "*"), ("psubscribe", f"{env.globex.prefix}*"), ("psubscribe", "__key*__:*"),
                ("psubscribe", f"{env.acme.prefix}n*")]  # patterns are compared literally: only its own
    for how, channel in attempts:
        eavesdropper = acme.pubsub()
        try:
            getattr(eavesdropper, how)(channel)  # the refusal arrives as the subscription's reply
            denied(lambda eavesdropper=eavesdropper: eavesdropper.get_message(timeout=5))  # type: ignore[misc]
        finally:
            eavesdropper.close()


async def test_read_only_tenant_reads_and_deletes_but_writes_nothing(env: Env, globex_library: str) -> None:
    await env.write(env.acme, read_only=True)
    acme, mine = env.connect(env.acme), env.acme.prefix
    env.admin.set(f"{mine}k", "v")
    env.admin.set(f"{mine}gone", "v")
    assert acme.get(f"{mine}k") == "v"
    assert acme.eval("return redis.call('GET', KEYS[1])", 1, f"{mine}k") == "v"
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        acme.eval("return redis.call('SET', KEYS[1], 'x')", 1, f"{mine}k")
    for attack in [lambda: acme.set(f"{mine}k", "x"), lambda: acme.hset(f"{mine}h", "f", "1"),
                   lambda: acme.xadd(f"{mine}s", {"f": "1"}), lambda: acme.zadd(f"{mine}z", {"m": 1}),
                   lambda: acme.expire(f"{mine}k", 10), lambda: acme.get(f"{env.globex.prefix}k"),
                   lambda: acme.execute_command("FUNCTION", "DELETE", globex_library),
                   lambda: acme.script_flush(), lambda: acme.execute_command("DBSIZE"),
                   lambda: acme.execute_command("PUBSUB", "CHANNELS")]:
        denied(attack)
    assert acme.delete(f"{mine}gone") == 1  # deleting is how a tenant gets back under its quota
    assert env.admin.get(f"{mine}k") == "v"


async def converge(backend: RedisBackend, targets: list[RedisTarget]) -> int:
    """The engine's Redis pass, reduced to ACLs: observe, compare with the canonical form, write on drift."""
    observed = await backend.observe([t.username for t in targets])
    writes = 0
    for target in targets:
        if acl_drift(target, observed[target.username], await backend.canonical_commands(target.read_only)):
            await backend.apply(target)
            writes += 1
    return writes


async def test_quiet_passes_write_nothing_in_either_variant(env: Env) -> None:
    await env.write(env.globex, read_only=True)
    targets = [env.acme.target, env.globex.target]
    assert await converge(env.backend, targets) == 0
    fresh = RedisBackend(f"redis://default:{env.admin.connection_pool.connection_kwargs['password']}"
                         f"@127.0.0.1:{env.port}/0")
    try:  # another operator process: learns the same canonical form (from Redis), writes nothing
        assert await converge(fresh, targets) == 0
    finally:
        await fresh.close()


class PrivateRedis:
    """A Redis of this test's own, with an aclfile, that the test restarts on the same port."""

    def __init__(self, base: Path) -> None:
        self.password = pysecrets.token_urlsafe(12)
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
        assert await converge(backend, [tenant.target]) == 1
        await backend.persist()  # ACL SAVE to the aclfile
        assert await converge(backend, [tenant.target]) == 0
        private_redis.stop()
        private_redis.start()  # the user comes back from the aclfile, its commands listed anew
        assert await converge(backend, [tenant.target]) == 0
        assert await converge(backend, [tenant.target]) == 0
        client = redis.Redis(host="127.0.0.1", port=private_redis.port, username=tenant.target.username,
                             password=tenant.password, decode_responses=True)
        assert client.set(f"{tenant.prefix}k", "v") and client.get(f"{tenant.prefix}k") == "v"
        denied(lambda: client.execute_command("DBSIZE"))
        client.close()
    finally:
        await backend.close()
