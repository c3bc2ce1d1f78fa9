"""Two tenants on one Redis attack each other and the server's shared state; the allowlist holds.

Each item of issue 14's Redis section: functions, the script cache, MEMORY,
PUBSUB introspection, DBSIZE and keyspace walks, other tenants' keys and channels,
and the read-only (over quota) variant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from .conftest import Stack
from .redis_helpers import Tenants, denied, pairs, two_tenants


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[Tenants]:
    async with two_tenants(stack.env["DYNABASE_REDIS_URL"]) as tenants:
        yield tenants


LIBRARY = """#!lua name={name}
redis.register_function('{name}_get', function(keys, args) return redis.call('GET', keys[1]) end)
"""


@pytest.fixture
def globex_library(env: Tenants) -> Iterator[str]:
    """A function library loaded on globex's behalf (tenants cannot load one themselves)."""
    name = env.globex.database
    env.admin.execute_command("FUNCTION", "LOAD", LIBRARY.format(name=name))
    yield name
    env.admin.execute_command("FUNCTION", "DELETE", name)


def library_names(admin: redis.Redis) -> set[str]:
    return {str(pairs(lib)["library_name"]) for lib in admin.execute_command("FUNCTION", "LIST")}


async def test_functions_are_out_of_every_tenants_reach(env: Tenants, globex_library: str) -> None:
    acme = env.connect(env.acme)
    attacks = [("FUNCTION", "DELETE", globex_library), ("FUNCTION", "FLUSH"), ("FUNCTION", "FLUSH", "ASYNC"),
               ("FUNCTION", "DUMP"), ("FUNCTION", "LIST"), ("FUNCTION", "LIST", "WITHCODE"),
               ("FUNCTION", "LOAD", "REPLACE", LIBRARY.format(name=globex_library)),
               ("FUNCTION", "LOAD", LIBRARY.format(name=env.acme.database)), ("FUNCTION", "KILL"),
               ("FUNCTION", "STATS"), ("FUNCTION", "RESTORE", "x", "FLUSH"),
               ("FCALL", f"{globex_library}_get", "1", f"{env.acme.prefix}k"),
               ("FCALL_RO", f"{globex_library}_get", "1", f"{env.acme.prefix}k")]
    for attack in attacks:
        denied(lambda attack=attack: acme.execute_command(*attack))
    assert globex_library in library_names(env.admin)
    assert env.acme.database not in library_names(env.admin)


async def test_script_cache_survives_other_tenants_and_scripts_touch_only_own_keys(env: Tenants) -> None:
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


async def test_server_wide_state_is_denied(env: Tenants) -> None:
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
            denied(lambda attack=attack: acme.execute_command(*attack))
    finally:
        platform.close()


async def test_a_tenant_works_freely_within_its_own_keys_and_channels(env: Tenants) -> None:
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


async def test_pubsub_reaches_own_channels_only(env: Tenants) -> None:
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
            denied(lambda eavesdropper=eavesdropper: eavesdropper.get_message(timeout=5))
        finally:
            eavesdropper.close()


async def test_read_only_tenant_reads_and_deletes_but_writes_nothing(env: Tenants, globex_library: str) -> None:
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
