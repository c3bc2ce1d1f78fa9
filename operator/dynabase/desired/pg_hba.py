"""Could a tenant's role log in to Postgres around the proxy? Judged from ``pg_hba_file_rules`` (pure).

Postgres takes the first pg_hba.conf line that matches a connection's type, database,
user and address, and that line alone decides: ``reject`` refuses, anything else lets
the password (or certificate, …) decide. A tenant knows its password, so a non-reject
line that a connection from outside the allowed sources (the PgBouncer agents, the
operator, headless mode: ``DYNABASE_POSTGRES_ALLOWED_SOURCES``) reaches first means the
tenant can skip the proxy's QPS limit, timeouts and metering. Lines are walked in
order, per kind of connection (Unix socket; TCP in plain, SSL and GSS-encrypted, since
``hostssl``/``hostnossl``/… match only some), keeping the address space that earlier
matching lines have already decided, so a ``reject`` before a wide line counts.

This reads pg_hba.conf, not the network: a line open to ``0.0.0.0/0`` is reported even
when a firewall or NetworkPolicy keeps outsiders from the port (list their range as
allowed then). Host names, ``samehost`` and ``samenet`` cannot be resolved here and
count as outside the allowed sources.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Kind = Literal["local", "plain", "ssl", "gssenc"]
TCP_KINDS: tuple[Kind, ...] = ("plain", "ssl", "gssenc")
# Which connection kinds each line type matches.
LINE_KINDS: dict[str, frozenset[Kind]] = {
    "local": frozenset({"local"}),
    "host": frozenset({"plain", "ssl", "gssenc"}),
    "hostssl": frozenset({"ssl"}),
    "hostnossl": frozenset({"plain", "gssenc"}),
    "hostgssenc": frozenset({"gssenc"}),
    "hostnogssenc": frozenset({"plain", "ssl"}),
}
KIND_WORDS: dict[Kind, str] = {"local": "over the Unix socket", "plain": "over TCP", "ssl": "over TCP with SSL",
                               "gssenc": "over TCP with GSS encryption"}
ALLOWED_VARIABLE = "DYNABASE_POSTGRES_ALLOWED_SOURCES"


@dataclass(frozen=True)
class HbaRule:
    """One row of pg_hba_file_rules (the file as it is on disk, which a reload loads)."""

    line_number: int
    type: str
    databases: tuple[str, ...]
    users: tuple[str, ...]
    address: str | None
    netmask: str | None
    auth_method: str
    error: str | None = None

    @property
    def text(self) -> str:
        """The line as pg_hba.conf would say it (options left out)."""
        where = "" if self.type == "local" else f" {self.address}" + (
            f"/{_prefix(self.netmask)}" if self.netmask else "")
        return f"{self.type} {','.join(self.databases)} {','.join(self.users)}{where} {self.auth_method}"

    @property
    def uses_groups(self) -> bool:
        return any(u.startswith("+") for u in self.users) or bool({"samerole", "samegroup"} & set(self.databases))


@dataclass(frozen=True)
class PgHbaObserved:
    rules: tuple[HbaRule, ...]
    memberships: Mapping[str, frozenset[str]] = field(default_factory=dict)  # role -> roles it is a member of


@dataclass(frozen=True)
class AllowedSources:
    """Where tenant roles may log in from: the Unix socket and/or address ranges."""

    local: bool = True
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowedSources:
        """``local,10.0.0.0/8,fd00::/8`` (``local`` = the Unix socket; an address alone is one host)."""
        local, networks = False, []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if item == "local":
                local = True
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is neither 'local' nor an address or CIDR range "
                                 "('off' turns the check off)") from None
        if not local and not networks:
            raise ValueError("no sources listed")
        return cls(local, tuple(networks))

    @classmethod
    def from_setting(cls, text: str) -> AllowedSources | None:
        """The variable's value: sources, or ``off`` (pg_hba.conf is not judged: no DirectAccess)."""
        return None if text.strip() == "off" else cls.parse(text)

    def describe(self) -> str:
        return ", ".join([*(["local"] if self.local else []), *(str(n) for n in self.networks)])

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class DirectAccess:
    """The verdict for one role: ``rule`` is the first line that lets it in from elsewhere, if any.
    ``open`` is None when pg_hba.conf cannot be judged (a line with an error)."""

    open: bool | None
    message: str
    rule: HbaRule | None = None


# -- address sets as sorted, disjoint integer intervals, per IP version -----------------

Intervals = tuple[tuple[int, int], ...]
AddressSet = tuple[Intervals, Intervals]  # (IPv4, IPv6)
EMPTY: AddressSet = ((), ())
EVERYWHERE: AddressSet = (((0, 2**32 - 1),), ((0, 2**128 - 1),))


def _union(a: Intervals, b: Intervals) -> Intervals:
    merged: list[tuple[int, int]] = []
    for low, high in sorted([*a, *b]):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _minus(a: Intervals, b: Intervals) -> Intervals:
    out: list[tuple[int, int]] = []
    for low, high in a:
        for cut_low, cut_high in b:
            if cut_high < low or cut_low > high:
                continue
            if cut_low > low:
                out.append((low, cut_low - 1))
            low = cut_high + 1
            if low > high:
                break
        if low <= high:
            out.append((low, high))
    return tuple(out)


def union(a: AddressSet, b: AddressSet) -> AddressSet:
    return _union(a[0], b[0]), _union(a[1], b[1])


def minus(a: AddressSet, b: AddressSet) -> AddressSet:
    return _minus(a[0], b[0]), _minus(a[1], b[1])


def of_networks(networks: Iterable[Network]) -> AddressSet:
    out = EMPTY
    for net in networks:
        span = ((int(net.network_address), int(net.broadcast_address)),)
        out = union(out, (span, ()) if net.version == 4 else ((), span))
    return out


def _prefix(netmask: str) -> int:
    return bin(int(ipaddress.ip_address(netmask))).count("1")


def rule_addresses(rule: HbaRule) -> AddressSet | None:
    """The addresses a host line matches; None when they cannot be known here (host names, samehost…)."""
    if rule.address == "all":
        return EVERYWHERE
    if rule.address is None or rule.netmask is None:
        return None
    try:
        return of_networks([ipaddress.ip_network(f"{rule.address}/{_prefix(rule.netmask)}", strict=False)])
    except ValueError:
        return None


def _example(addresses: AddressSet) -> str:
    """An address of the set, for messages: "10.0.0.1" for one address, "addresses such as …" for more."""
    v4, v6 = addresses
    low, high = v4[0] if v4 else v6[0]
    first = str(ipaddress.IPv4Address(low) if v4 else ipaddress.IPv6Address(low))
    several = low != high or len(v4) + len(v6) > 1
    return f"addresses such as {first}" if several else first


# -- matching ----------------------------------------------------------------------------


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("/"):  # Postgres 16+: a regular expression
        return re.search(pattern[1:], name) is not None
    return pattern == name


def matches_role(rule: HbaRule, database: str, role: str, groups: frozenset[str]) -> bool:
    """Whether ``rule`` applies to ``role`` connecting to ``database`` (``groups``: roles it belongs to)."""
    member_of = groups | {role}
    database_ok = any(
        d == "all" or (d == "sameuser" and database == role)
        or (d in ("samerole", "samegroup") and database in member_of)
        or (d != "replication" and _name_matches(d, database))  # replication: not a connection to a database
        for d in rule.databases
    )
    user_ok = any(u == "all" or (u.startswith("+") and u[1:] in member_of) or _name_matches(u, role)
                  for u in rule.users)
    return database_ok and user_ok


def direct_access(observed: PgHbaObserved, database: str, role: str, allowed: AllowedSources) -> DirectAccess:
    """Whether ``role`` could log in to ``database`` from outside ``allowed``, and the line that lets it."""
    broken = [r for r in observed.rules if r.error]
    if broken:
        first = broken[0]
        return DirectAccess(None, f"pg_hba.conf line {first.line_number} has an error ({first.error}): Postgres "
                            "keeps its previous rules until the file is fixed and reloaded, and those cannot be "
                            "read, so whether tenant roles can go around the proxy is unknown")
    groups = observed.memberships.get(role, frozenset())
    rules = [r for r in observed.rules if matches_role(r, database, role, groups)]
    findings = [found for kind in ("local", *TCP_KINDS) if (found := _first_open(rules, kind, allowed))]
    if findings:
        rule, why = min(findings, key=lambda f: f[0].line_number)
        return DirectAccess(True, f"role {role} can log in around the proxy: pg_hba.conf line {rule.line_number} "
                            f"({rule.text}) accepts it {why}, outside the allowed sources ({allowed.describe()}; "
                            f"{ALLOWED_VARIABLE}); add a reject line before it, narrow it, or keep Postgres "
                            "off networks tenants reach", rule)
    return DirectAccess(False, f"role {role} can log in only from the allowed sources ({allowed.describe()})")


def _first_open(rules: Sequence[HbaRule], kind: Kind, allowed: AllowedSources) -> tuple[HbaRule, str] | None:
    """The first line that accepts ``kind`` connections from outside ``allowed``, and how."""
    allowed_addresses = of_networks(allowed.networks)
    decided = EMPTY  # addresses an earlier matching line already answered for
    for rule in rules:
        if kind not in LINE_KINDS.get(rule.type, frozenset()):
            continue
        if kind == "local":
            if rule.auth_method == "reject" or allowed.local:
                return None  # the first local line decides for every socket connection
            return rule, KIND_WORDS[kind]
        addresses = rule_addresses(rule)
        if addresses is None:
            if rule.auth_method != "reject":
                return rule, f"{KIND_WORDS[kind]} from {rule.address} (which cannot be checked here)"
            continue  # a reject of unknown reach decides nothing we can count on
        if rule.auth_method != "reject":
            reachable = minus(minus(addresses, decided), allowed_addresses)
            if reachable != EMPTY:
                return rule, f"{KIND_WORDS[kind]} from {_example(reachable)}"
        decided = union(decided, addresses)
    return None
