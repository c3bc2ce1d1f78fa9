"""Which Redis commands a tenant may run: an allowlist derived from the server's own command table. Pure.

The tenant's ACL starts from `-@all` and names each allowed command or subcommand,
so anything not named below (including whatever a newer Redis adds) is denied by
construction. A command is allowed when Redis itself confines it to the tenant:

- keyed: every key it touches is declared by a complete key spec, so ACL checks
  each one against `~t:<db>:*` (derived from `COMMAND INFO`, not listed here);
- connection: it only reads or changes the caller's own connection (fixed list);
- channel: its channels are checked against `&t:<db>:*` (fixed list);
- script: EVAL and friends, whose keys Redis 7 checks inside the script too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Only the caller's connection (or, for TIME and COMMAND, fixed facts about the server
# that say nothing about other tenants). Names the server does not know are skipped,
# so newer ones (CLIENT SETINFO, which client libraries send on connect) are ready.
CONNECTION = (
    "auth", "hello", "ping", "echo", "quit", "reset",
    "multi", "exec", "discard", "unwatch",
    "client|id", "client|info", "client|getname", "client|setname", "client|setinfo", "client|reply",
    "client|no-touch",
    "time",
    "command|count", "command|docs", "command|info", "command|list", "command|getkeys",
    "command|getkeysandflags",
)
# Channels, checked against the tenant's `&t:<db>:*` pattern (PSUBSCRIBE only with that
# exact pattern: Redis compares subscription patterns literally). Unsubscribing needs no check.
CHANNEL = ("publish", "subscribe", "psubscribe", "unsubscribe", "punsubscribe",
           "spublish", "ssubscribe", "sunsubscribe")
# Server-side logic: the script runs with the caller's ACL, so every key it touches is
# checked against the tenant's pattern. SCRIPT LOAD/EXISTS only add to or probe the
# content-addressed script cache, which EVAL and EVALSHA already do.
SCRIPT = ("eval", "evalsha", "eval_ro", "evalsha_ro", "script|load", "script|exists")
# Keyed commands whose key names are confined but which still leave the tenant's space.
KEYED_DENIED = {
    "move": "moves a key to another database, out of the quota census and out of reach of deletion",
    "copy": "its DB option copies into another database, out of the quota census",
}
# Key specs with variable_flags make Redis find keys with the command's own getkeys
# function instead of the specs; these two have one (verified by the tests' ACL DRYRUN).
VARIABLE_FLAGS_VETTED = ("set", "bitfield")
# Still kept in read-only mode (quota exceeded): deleting keys is how a tenant gets back under.
READ_ONLY_WRITES = ("del", "unlink")

# Denied anyway (by the rules below); the reason says what they would reach.
NOTED_DENIALS = {
    "function|": "function libraries are one namespace for the whole server: tenants cannot load, replace, "
                 "delete, list, dump, restore, flush or kill them",
    "fcall": "calls the server-wide function namespace, which only the platform can load",
    "fcall_ro": "calls the server-wide function namespace, which only the platform can load",
    "script|flush": "empties every tenant's script cache",
    "script|kill": "kills whichever script is running, any tenant's",
    "script|debug": "debugs scripts on the server (synchronous mode blocks it)",
    "pubsub|": "lists other tenants' and the platform's channels and subscriber counts",
    "client|tracking": "broadcast tracking hands out every modified key's name, any tenant's",
    "client|list": "shows every connection", "client|kill": "ends other connections",
    "memory|": "server-wide memory state (MEMORY USAGE of an own key is allowed)",
    "dbsize": "the whole keyspace's size", "info": "server-wide counters, including the keyspace's size",
    "keys": "walks the whole keyspace", "scan": "walks the whole keyspace", "randomkey": "any tenant's key",
    "select": "one database per server: the tenant's keys live in database 0",
}

_SERVER_CATEGORIES = frozenset({"@admin", "@dangerous"})
_EXPLICIT_CATEGORIES = frozenset({"@scripting", "@pubsub"})  # only what CHANNEL and SCRIPT name


@dataclass(frozen=True)
class KeySpec:
    flags: frozenset[str]
    begin_search: str  # index | keyword | unknown
    find_keys: str  # range | keynum | unknown


@dataclass(frozen=True)
class CommandSpec:
    name: str  # "get", or "client|setname" for a subcommand
    arity: int
    flags: frozenset[str]
    categories: frozenset[str]
    key_specs: tuple[KeySpec, ...]


@dataclass(frozen=True)
class Decision:
    kind: str  # keyed | connection | channel | script | denied
    reason: str

    @property
    def allowed(self) -> bool:
        return self.kind != "denied"


def decide(command: CommandSpec) -> Decision:
    """Whether a tenant may run this command or subcommand, and why."""
    decision = _by_rules(command)
    if decision.allowed:
        return decision
    container = command.name.split("|")[0] + "|"
    return Decision("denied", NOTED_DENIALS.get(command.name) or NOTED_DENIALS.get(container) or decision.reason)


def _by_rules(command: CommandSpec) -> Decision:
    name = command.name
    if name in CONNECTION:
        return Decision("connection", "acts on the caller's own connection only")
    if name in CHANNEL:
        return Decision("channel", "channels are checked against the tenant's channel pattern")
    if name in SCRIPT:
        return Decision("script", "the script runs under the tenant's ACL, key by key")
    if name in KEYED_DENIED:
        return Decision("denied", KEYED_DENIED[name])
    if "admin" in command.flags or command.categories & _SERVER_CATEGORIES:
        return Decision("denied", "administrative or marked dangerous by Redis")
    if "module" in command.flags:
        return Decision("denied", "a module command: not reviewed")
    if command.categories & _EXPLICIT_CATEGORIES:
        return Decision("denied", "scripting or pub/sub beyond the fixed lists: server-wide state")
    if not command.key_specs:
        return Decision("denied", "declares no keys: it reaches server-wide state")
    for spec in command.key_specs:
        if spec.flags & {"incomplete", "not_key"} or spec.begin_search not in ("index", "keyword") \
                or spec.find_keys not in ("range", "keynum"):
            return Decision("denied", "some of its keys are not declared by a complete key spec")
        if "variable_flags" in spec.flags and name not in VARIABLE_FLAGS_VETTED:
            return Decision("denied", "variable_flags key spec not vetted: Redis would not check its keys "
                                      "from the specs")
    return Decision("keyed", "every key is declared by a key spec, so the key pattern confines it")


def classify(commands: Iterable[CommandSpec]) -> dict[str, Decision]:
    return {command.name: decide(command) for command in commands}


@dataclass(frozen=True)
class TenantCommands:
    """The tenant allowlist for one server's command table, and its read-only subset."""

    allowed: tuple[str, ...]
    read_only: tuple[str, ...]

    @classmethod
    def from_server(cls, commands: Iterable[CommandSpec]) -> TenantCommands:
        table = {c.name: c for c in commands}
        allowed = sorted(name for name, c in table.items() if decide(c).allowed)
        reads = [n for n in allowed if "write" not in table[n].flags or n in READ_ONLY_WRITES]
        return cls(tuple(allowed), tuple(reads))

    def rules(self, read_only: bool) -> list[str]:
        """ACL rules: nothing, then each allowed command by name (never a category)."""
        return ["-@all", *(f"+{name}" for name in (self.read_only if read_only else self.allowed))]


def parse_command_info(reply: Any) -> list[CommandSpec]:
    """The leaf commands (subcommands instead of their containers) of a raw `COMMAND INFO` reply."""
    out: list[CommandSpec] = []
    for entry in reply or ():
        if entry is None:
            continue
        if len(entry) < 10:
            raise ValueError(f"COMMAND INFO entry {entry[0]!r} has no key specs: the operator needs Redis 7 or newer")
        name, arity, flags, _, _, _, categories, _, key_specs, subcommands = entry[:10]
        if subcommands:
            out.extend(parse_command_info(subcommands))
            continue
        specs = []
        for raw in key_specs:
            spec = _as_map(raw)
            specs.append(KeySpec(frozenset(str(f).lower() for f in spec.get("flags") or ()),
                                 str(_as_map(spec.get("begin_search")).get("type", "unknown")),
                                 str(_as_map(spec.get("find_keys")).get("type", "unknown"))))
        out.append(CommandSpec(str(name).lower(), int(arity), frozenset(str(f).lower() for f in flags),
                               frozenset(str(c).lower() for c in categories), tuple(specs)))
    return out


def _as_map(reply: Any) -> Mapping[str, Any]:
    """RESP3 gives maps, RESP2 flat key/value lists."""
    if isinstance(reply, Mapping):
        return {str(k): v for k, v in reply.items()}
    items = list(reply or ())
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
