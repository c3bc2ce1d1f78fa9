"""Shared model plumbing: camelCase fields and cross-field rules kept in one place.

Each cross-field rule is written twice on purpose — once in CEL for the
apiserver (``x-kubernetes-validations``) and once in Python for headless mode —
but with a single message, so a person sees the same words from
``kubectl apply`` and from ``dynabase validate``. Tests run both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the CRD, a Python predicate for everything else."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None  # reported path, relative to the model

    def cel_validation(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


def _schema_rules(schema: dict[str, Any], model: type[Any]) -> None:
    # The model's rules travel with its JSON schema; crd.structural keeps them where the model sits.
    rules = [rule.cel_validation() for rule in getattr(model, "rules", ())]
    if rules:
        schema["x-kubernetes-validations"] = rules


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_schema_rules,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in self.rules:
            if not rule.holds(self):
                # ctx.field lets error reports point at the offending field's line.
                field = (rule.field_path or "").lstrip(".")
                raise PydanticCustomError("rule", rule.message, {"field": field} if field else None)
        return self
