"""How a limit field is declared, and what one declaration yields.

A limit is a typed attribute of a frozen section dataclass in
``dynabase.spec.limits``; its default is the documented default and its
metadata a ``Limit``::

    connection_limit: int = limit(10, Limit("CONNECTION LIMIT of the tenant's login role.",
                                            ge=-1, le=10_000, unlimited="negative", ...))

The attribute is what the engine and the backends read, statically typed. The
same statement gives the optional field of the spec models, the CRD schema and
its CEL, the bounds ``dynabase validate`` checks (with the CRD's message), the
effective value with defaults applied, and the keys the backends write.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic.alias_generators import to_camel

from . import cel
from .base import Rule
from .units import ByteSize, Duration

T = TypeVar("T")
S = TypeVar("S")

# What an absent or special value means to the backend, for reviews and messages.
Unlimited = Literal["absent", "negative", "zero"]
PgBouncerPlace = Literal["ini", "database", "user", "shown"]
_METADATA_KEY = "dynabase.limit"


@dataclass(frozen=True)
class PgBouncerKeys:
    """Where a pool setting goes in pgbouncer.ini and where the agent reads it back."""

    ini: str  # the [pgbouncer] setting: the pool's own value
    database: str | None = None  # key in a tenant's [databases] entry
    user: str | None = None  # key in a tenant's [users] entry
    shown: str | None = None  # the SHOW DATABASES column the agent confirms

    def key(self, place: PgBouncerPlace) -> str | None:
        return {"ini": self.ini, "database": self.database, "user": self.user, "shown": self.shown}[place]


@dataclass(frozen=True)
class Limit:
    description: str  # what it limits; the default is appended from the attribute's default
    alias: str | None = None  # manifest name where camelCase of the attribute is not it (vCPUs)
    # Numbers: bounds, as OpenAPI minimum/maximum in the CRD.
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    # Durations and sizes: bounds written as in a manifest, checked by a CEL rule in the CRD.
    at_least: str | None = None
    at_most: str | None = None
    example: str | None = None  # a good value, for messages
    unlimited: Unlimited | None = None  # which value means "no limit"
    default_from: str | None = None  # when absent: this sibling's effective value (burst ← qps)
    absent: str | None = None  # what an absent value means, when the default is None
    # Backend mappings.
    review: str | None = None  # label in `dynabase plan --base` reviews
    org: str | None = None  # key in the MongoDB org document
    role_setting: str | None = None  # Postgres setting on the tenant role
    pgbouncer: PgBouncerKeys | None = None


def limit(default: T, declaration: Limit) -> T:
    """A section attribute: its default, with the declaration as field metadata."""
    return dataclasses.field(default=default, metadata={_METADATA_KEY: declaration})


@dataclass(frozen=True)
class LimitField:
    """One declared limit, resolved from its section class."""

    section: str
    name: str
    value_type: Any  # the annotation without None: int, float, bool, Duration, ByteSize or a Literal
    default: object
    limit: Limit

    @property
    def alias(self) -> str:
        return self.limit.alias or to_camel(self.name)

    @property
    def unit(self) -> type[Duration] | type[ByteSize] | None:
        return self.value_type if self.value_type in (Duration, ByteSize) else None

    @property
    def choices(self) -> tuple[str, ...]:
        return typing.get_args(self.value_type) if typing.get_origin(self.value_type) is Literal else ()

    def read(self, limits: object) -> object:
        """This limit's value in effective limits (anything with the sections as attributes)."""
        return getattr(getattr(limits, self.section), self.name)

    # -- what absent and special values mean ---------------------------------------

    def is_unlimited(self, value: object) -> bool:
        kind = self.limit.unlimited
        if value is None:
            return kind == "absent"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return (kind == "negative" and value < 0) or (kind == "zero" and value == 0)

    def show(self, value: object) -> str:
        """The value as reviews and messages print it."""
        if self.is_unlimited(value):
            return "unlimited"
        return "not set" if value is None else str(value)

    def default_sentence(self) -> str:
        if self.limit.default_from is not None:
            return f"Default = {to_camel(self.limit.default_from)}."
        if self.default is None:
            return self.limit.absent or ("Absent = unlimited." if self.limit.unlimited == "absent" else "")
        shown = str(self.default).lower() if isinstance(self.default, bool) else str(self.default)
        return f"Default {shown}."

    # -- bounds of durations and sizes -----------------------------------------------

    @functools.cached_property
    def _bounds(self) -> tuple[int | None, int | None]:
        unit = self.unit
        if unit is None:
            return None, None
        low, high = self.limit.at_least, self.limit.at_most
        return (None if low is None else unit.parse(low).amount, None if high is None else unit.parse(high).amount)

    @property
    def range_message(self) -> str | None:
        """What an out-of-range duration or size is told; {value} is its text."""
        low, high = self.limit.at_least, self.limit.at_most
        if low is None and high is None:
            return None
        span = f"between {low} and {high}" if low and high else f"at least {low}" if low else f"at most {high}"
        example = self.limit.example or low or high
        return f"{self.alias} must be {span} (got {{value}}); for example {self.alias}: {example}"

    def in_range(self, value: Duration | ByteSize) -> bool:
        low, high = self._bounds
        return (low is None or value.amount >= low) and (high is None or value.amount <= high)

    def cel_range_rule(self) -> dict[str, str] | None:
        unit, message = self.unit, self.range_message
        if unit is None or message is None:
            return None
        low, high = self._bounds
        checks = [f"v >= {cel.number(low)}"] if low is not None else []
        checks += [f"v <= {cel.number(high)}"] if high is not None else []
        # [x].all(v, …) names the amount once (the CRD's CEL has no cel.bind); a malformed
        # value is left to the format rule.
        rule = (f"!self.matches({cel.literal(unit.pattern)})"
                f" || [{unit.cel_amount('self')}].all(v, {' && '.join(checks)})")
        return {"rule": rule, "messageExpression": cel.message_expression(message, {"value": "self"})}


def section_fields(section: str, section_type: type[Any]) -> tuple[LimitField, ...]:
    hints = typing.get_type_hints(section_type)
    out = []
    for item in dataclasses.fields(section_type):
        declaration = item.metadata.get(_METADATA_KEY)
        if not isinstance(declaration, Limit):
            raise TypeError(f"{section_type.__name__}.{item.name} is not declared with limit(...)")
        hint = hints[item.name]
        options = [t for t in typing.get_args(hint) if t is not type(None)] if _is_union(hint) else [hint]
        if len(options) != 1:
            raise TypeError(f"{section_type.__name__}.{item.name}: a limit has one type (or None), not {hint}")
        out.append(LimitField(section, item.name, options[0], item.default, declaration))
    return tuple(out)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def resolve(section_type: type[S], fields: tuple[LimitField, ...], declared: Mapping[str, object]) -> S:
    """The section with defaults where nothing declares a value (and siblings for default_from)."""
    values = {f.name: declared.get(f.name, f.default) for f in fields}
    for f in fields:
        if f.limit.default_from is not None and declared.get(f.name) is None:
            values[f.name] = values[f.limit.default_from]
    return section_type(**values)


@dataclass(frozen=True)
class CrossRule:
    """A rule over several limits: one CEL expression, one Python predicate, one message.

    The CEL sits on the schema node of ``at`` (a section, or None for all limits).
    ``holds`` gets the operands' values in order, None where undeclared; the same
    predicate checks the spec models and the merged effective limits. The message
    has no values in it: the CRD's CEL cannot afford turning numbers into text
    (its cost estimate of string(int) is unbounded), and a manifest error points
    at the line anyway; effective limits, merged from several places, add them.
    """

    at: str | None
    operands: tuple[LimitField, ...]
    holds: Callable[..., bool]
    cel: str
    message: str
    field_path: str | None = None  # reported path, relative to ``at``

    def values_in(self, node: object) -> list[object]:
        """The operands read from ``node`` (a spec model or effective limits at ``at``); None where absent."""
        out = []
        for f in self.operands:
            value = node if self.at is not None else getattr(node, f.section)
            out.append(getattr(value, f.name) if value is not None else None)
        return out

    def explain(self, values: list[object]) -> str:
        """The message with the operands' values, for merged limits."""
        shown = ", ".join(f"{f.section}.{f.alias} {v}" for f, v in zip(self.operands, values, strict=True))
        return f"{self.message} (here {shown})"

    def as_rule(self) -> Rule:
        """The rule as the spec model at ``at`` checks it (and carries it into the CRD)."""
        return Rule(self.cel, self.message, lambda model: bool(self.holds(*self.values_in(model))), self.field_path)
