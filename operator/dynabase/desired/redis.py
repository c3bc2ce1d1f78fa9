"""Redis: per-tenant ACL users confined to their key prefix, and quota decisions. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .effective import RedisEffective
from .redis_commands import TenantCommands


def acl_username(database: str) -> str:
    return f"tenant_{database}"


def key_prefix(database: str) -> str:
    return f"t:{database}:"


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def command_rules(read_only: bool, commands: TenantCommands) -> list[str]:
    """The allowlist learned from the server; over quota only its read commands (and DEL/UNLINK)."""
    return commands.rules(read_only)


@dataclass(frozen=True)
class RedisTarget:
    key: str
    database: str
    password_sha256: str
    read_only: bool
    present: bool = True  # False: remove the user
    enabled: bool = True  # False (suspended): the user stays but cannot log in

    @property
    def username(self) -> str:
        return acl_username(self.database)

    def setuser_args(self, rules: Sequence[str]) -> list[str]:
        """ACL SETUSER arguments; `rules` from command_rules for this target's read_only."""
        prefix = key_prefix(self.database)
        return ["reset", "on" if self.enabled else "off", f"#{self.password_sha256}", f"~{prefix}*",
                "resetchannels", f"&{prefix}*", *rules]


def comparable_commands(description: str) -> str:
    """ACL GETUSER's `commands` in a form that is equal exactly when the rights are: for comparing, never for
    writing back. Redis 7.0 describes a user from its command bitmap: first categories, in a fixed order, then
    single commands in the order of its command table's hash dict, which differs between processes and changes
    as that dict rehashes. Those single-command rules never act on each other (a container is followed by its
    own subcommands), so they are sorted; later versions give our rules back as written (all `+`, any order)."""
    tokens = description.split()
    lead = next((i for i, token in enumerate(tokens) if "@" not in token), len(tokens))
    return " ".join(tokens[:lead] + sorted(tokens[lead:]))


@dataclass(frozen=True)
class ObservedAcl:
    """One ACL user as observed; `commands` in comparable_commands' form."""

    flags: tuple[str, ...]
    passwords: tuple[str, ...]
    commands: str
    keys: str
    channels: str


def acl_drift(target: RedisTarget, observed: ObservedAcl | None, canonical_commands: str) -> list[str]:
    """Why the user must be rewritten (empty: it matches)."""
    if observed is None:
        return ["create ACL user"]
    why = []
    prefix = key_prefix(target.database)
    if ("on" in observed.flags) != target.enabled:
        why.append("user is disabled" if target.enabled else "user is enabled")
    if observed.passwords != (target.password_sha256,):
        why.append("password differs")
    if observed.keys != f"~{prefix}*":
        why.append(f"key patterns are {observed.keys!r}")
    if observed.channels != f"&{prefix}*":
        why.append(f"channels are {observed.channels!r}")
    if observed.commands != canonical_commands:
        why.append(f"commands differ from the allowlist ({_rule_diff(observed.commands, canonical_commands)})")
    return why


def _rule_diff(observed: str, wanted: str) -> str:
    """A short account of how two ACL command descriptions differ (the full ones run to hundreds of rules)."""
    has, want = observed.split(), wanted.split()
    extra, missing = [r for r in has if r not in want], [r for r in want if r not in has]

    def some(rules: list[str]) -> str:
        return " ".join(rules[:3]) + (f" and {len(rules) - 3} more" if len(rules) > 3 else "")

    parts = ([f"has {some(extra)}"] if extra else []) + ([f"lacks {some(missing)}"] if missing else [])
    return "; ".join(parts) or "same rules in another order"


@dataclass(frozen=True)
class QuotaVerdict:
    over: bool
    message: str
    measured: bool = True  # False: the census has not counted the tenant yet; ``over`` is the last verdict


def quota_verdict(limits: RedisEffective, keys: int | None, memory_bytes: int | None,
                  *, read_only_before: bool = False) -> QuotaVerdict:
    """``read_only_before``: the user is read-only now. Until the census has counted the tenant (a
    new operator process walks the keyspace over several passes) that verdict holds."""
    if keys is None:
        if read_only_before and (limits.max_keys is not None or limits.max_memory is not None):
            return QuotaVerdict(True, "usage not measured yet since this reconciler started; writes stay "
                                      "refused until it is", measured=False)
        return QuotaVerdict(False, "usage not measured yet", measured=False)
    if limits.max_keys is not None and keys > limits.max_keys:
        return QuotaVerdict(True, f"{keys} keys, tier allows {limits.max_keys}; writes are refused until "
                                  "keys are deleted or the tier is raised")
    if limits.max_memory is not None and memory_bytes is not None and memory_bytes > limits.max_memory.bytes:
        return QuotaVerdict(True, f"about {memory_bytes // 1024} kB used, tier allows {limits.max_memory}; "
                                  "writes are refused until usage drops or the tier is raised")
    return QuotaVerdict(False, f"{keys} keys")
