"""TierPolicy: the named tiers (FREE, STARTER, PRO, ENTERPRISE …) and their limits.

The limit models are generated from the declarations in ``dynabase.spec.limits``.
Every limit is optional here: ``None`` means "not declared here", which matters
for overrides: a tenant's override is merged field by field over its tier, and
the documented default applies only where neither declares a value (see
``dynabase.desired.effective``). Defaults are therefore *not* written into the
CRD schema; the apiserver would otherwise fill them into overrides too.
"""

from __future__ import annotations

import functools
import re
import types
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from .base import Model, Rule
from .limit import LimitField
from .limits import CROSS_RULES, FIELDS, SECTION_TYPES
from .units import ByteSize, Duration

TIER_NAME_PATTERN = r"^[A-Z][A-Z0-9_]{0,31}$"
MAX_TIERS = 32


class LimitsModel(Model):
    """Base of the generated limit models (a section's, and TierLimits)."""


INT64 = (-(2**63), 2**63 - 1)  # the apiserver holds no other integers (and cannot state this bound)


def _whole_number(value: Any) -> Any:
    # The apiserver takes 5.0 for an integer field; strings and booleans it refuses, and so do we.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int64(value: int | None) -> int | None:
    if value is not None and not INT64[0] <= value <= INT64[1]:
        raise PydanticCustomError("int64", "{value} is not a 64-bit integer; write a smaller number", {"value": value})
    return value


def _check_range(declared: LimitField, value: Duration | ByteSize | None) -> Duration | ByteSize | None:
    if value is not None and not declared.in_range(value):
        raise PydanticCustomError("rule", declared.range_message or "", {"value": value.text})
    return value


def _description(declared: LimitField) -> str:
    low, high = declared.limit.at_least, declared.limit.at_most
    bounds = (f"Between {low} and {high}." if low and high else f"At least {low}." if low
              else f"At most {high}." if high else "")
    return " ".join(part for part in (declared.limit.description, bounds, declared.default_sentence()) if part)


def _spec_field(declared: LimitField) -> tuple[Any, Any]:
    """The optional pydantic field of one limit: None = not declared at this level."""
    validators: list[Any] = []
    extra: dict[str, Any] = {}
    if declared.value_type is int:
        validators += [BeforeValidator(_whole_number), AfterValidator(_int64)]
    range_rule = declared.cel_range_rule()
    if range_rule is not None:
        validators.append(AfterValidator(functools.partial(_check_range, declared)))
        extra["x-kubernetes-validations"] = [range_rule]
    options: dict[str, Any] = {key: getattr(declared.limit, key) for key in ("ge", "gt", "le")
                               if getattr(declared.limit, key) is not None}
    if declared.value_type in (int, float, bool):
        options["strict"] = True  # as in the apiserver: "5" or true is not a number
    if declared.value_type is float:
        options["allow_inf_nan"] = False  # JSON, and so the apiserver, has neither
    if extra:
        options["json_schema_extra"] = extra
    annotation = Annotated[declared.value_type | None, *validators] if validators else declared.value_type | None
    return annotation, Field(None, alias=declared.alias, description=_description(declared), **options)


def _model(name: str, doc: str, fields: dict[str, tuple[Any, Any]], rules: tuple[Rule, ...]) -> type[LimitsModel]:
    def body(namespace: dict[str, Any]) -> None:
        namespace.update({key: info for key, (_, info) in fields.items()})
        namespace.update(__module__=__name__, __doc__=doc, rules=rules,
                         __annotations__={key: annotation for key, (annotation, _) in fields.items()})

    return types.new_class(name, (LimitsModel,), exec_body=body)


def _section_model(section: str) -> type[LimitsModel]:
    name = SECTION_TYPES[section].__name__.removesuffix("Effective") + "Limits"
    rules = tuple(rule.as_rule() for rule in CROSS_RULES if rule.at == section)
    return _model(name, f"The {section} limits a tier or an override declares.",
                  {f.name: _spec_field(f) for f in FIELDS[section]}, rules)


SECTION_MODELS: dict[str, type[LimitsModel]] = {section: _section_model(section) for section in FIELDS}

if TYPE_CHECKING:
    # Generated below; nothing reads a section's fields statically (effective limits are typed).
    TierLimits = LimitsModel
else:
    TierLimits = _model(
        "TierLimits",
        "Every limit a tier declares; also the shape of a tenant's overrides.",
        {section: (model | None, Field(None)) for section, model in SECTION_MODELS.items()},
        tuple(rule.as_rule() for rule in CROSS_RULES if rule.at is None),
    )


class Tier(TierLimits):
    rank: int = Field(
        ..., ge=0, le=1000,
        description="Order of tiers: a move to a higher rank is an upgrade (applied at once), "
        "to a lower rank a downgrade (applied after the grace period).",
    )
    description: str | None = Field(None, max_length=256)


MAX_WARM_POOL = 10_000


class WarmPool(Model):
    """Databases created ahead of sign-ups for this policy's tenants (see desired/warm_pool.py)."""

    size: int = Field(
        0, ge=0, le=MAX_WARM_POOL, strict=True,
        description="Empty tenant databases kept ready; a new tenant of this policy claims one "
        "instead of waiting for CREATE DATABASE. Each costs the disk of an empty database "
        "(about 7.5 MB). 0 keeps none.",
    )


class TierPolicySpec(Model):
    tiers: dict[str, Tier] = Field(
        ..., min_length=1, max_length=MAX_TIERS,
        description="Tiers by name (upper case, e.g. FREE, PRO).",
    )
    warm_pool: WarmPool | None = Field(
        None, description="Tenant databases created ahead of sign-ups (refilled in the background).",
    )

    rules = (
        Rule(
            cel="self.tiers.all(name, name.matches('" + TIER_NAME_PATTERN + "'))",
            message="tier names must be upper case letters, digits and _ starting with a letter "
            "(at most 32), for example FREE or PRO_PLUS",
            holds=lambda m: all(re.fullmatch(TIER_NAME_PATTERN, n) for n in m.tiers),
            field_path=".tiers",
        ),
        Rule(
            cel="self.tiers.all(a, self.tiers.all(b, a == b || self.tiers[a].rank != self.tiers[b].rank))",
            message="every tier needs its own rank: ranks order upgrades and downgrades; "
            "give each tier a different rank",
            holds=lambda m: len({t.rank for t in m.tiers.values()}) == len(m.tiers),
            field_path=".tiers",
        ),
    )
