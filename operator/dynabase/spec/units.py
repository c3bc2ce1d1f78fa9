"""Typed durations and byte sizes, parsed once from their manifest strings.

Manifests write ``10s``, ``5m``, ``1h30m`` and ``64MB``, ``1GB``; everything
after parsing works with exact integers (milliseconds, bytes) so rendering to
Postgres settings never rounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from . import cel

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"
SIZE_PATTERN = r"^[0-9]+(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)$"
MAX_LENGTH = 32  # also bounds the cost of the CRD's CEL rules that read the string

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_SIZE_PARTS = re.compile(r"([0-9]+)([A-Za-z]+)")
_DURATION_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# Binary multiples, as postgresql.conf and Redis' maxmemory read them.
_SIZE_UNIT_BYTES = {
    "B": 1,
    "kB": 1024, "KB": 1024, "KiB": 1024,
    "MB": 1024**2, "MiB": 1024**2,
    "GB": 1024**3, "GiB": 1024**3,
    "TB": 1024**4, "TiB": 1024**4,
}


class _StringValue:
    """Shared pydantic plumbing: parse from str, serialize back to the text.

    The text is taken as written (no trimming), so the apiserver, which checks
    the same pattern in CEL, accepts exactly what ``parse`` accepts.
    """

    pattern: ClassVar[str]
    example: ClassVar[str]
    # What a bad value gets told, by Python and by the CRD; {value} is the text.
    format_message: ClassVar[str]
    text: str

    @classmethod
    def parse(cls, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def amount(self) -> int:  # pragma: no cover - overridden
        """The exact quantity (milliseconds, bytes) that bounds are compared with."""
        raise NotImplementedError

    @classmethod
    def cel_amount(cls, text: str) -> str:  # pragma: no cover - overridden
        """A CEL double expression for the amount of the string expression ``text`` (which matches ``pattern``)."""
        raise NotImplementedError

    @classmethod
    def _text_of(cls, value: Any, kind: str, type_message: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str):
            raise PydanticCustomError(f"{kind}_type", type_message, {"value": value})
        if len(value) > MAX_LENGTH or not re.fullmatch(cls.pattern, value):
            raise PydanticCustomError(f"{kind}_format", cls.format_message, {"value": value})
        return value

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.text),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # The format is a CEL rule rather than a pattern so the apiserver says what `dynabase validate` says.
        return {
            "type": "string",
            "maxLength": MAX_LENGTH,
            "x-kubernetes-validations": [{
                "rule": f"self.matches({cel.literal(cls.pattern)})",
                "messageExpression": cel.message_expression(cls.format_message, {"value": "self"}),
            }],
        }

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, order=True)
class Duration(_StringValue):
    milliseconds: int
    # Equal durations compare equal however they were written (60s == 1m).
    text: str = field(default="", compare=False)

    pattern: ClassVar[str] = DURATION_PATTERN
    example: ClassVar[str] = "30s"
    format_message: ClassVar[str] = (
        "'{value}' is not a duration: write a number with a unit ms, s, m, h or d (for example 10s, 5m, 1h30m)"
    )

    @property
    def seconds(self) -> float:
        return self.milliseconds / 1000

    @property
    def amount(self) -> int:
        return self.milliseconds

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, Duration):
            return value
        text = cls._text_of(value, "duration", "expected a duration string such as 10s, 5m or 1h30m, got '{value}'")
        total = sum(int(n) * _DURATION_UNIT_MS[u] for n, u in _DURATION_PART.findall(text))
        return cls(total, text)

    @classmethod
    def cel_amount(cls, text: str) -> str:
        # The sum of the parts (1h30m), in doubles: exact near any bound, and no overflow error on huge values.
        units = _cel_map(_DURATION_UNIT_MS)
        return (f"{text}.findAll({cel.literal(_DURATION_PART.pattern)})"
                f".map(p, double(p.find('^[0-9]+')) * {units}[p.find('[a-z]+$')]).sum()")

    @classmethod
    def of_ms(cls, milliseconds: int) -> Duration:
        return cls(milliseconds, format_ms(milliseconds))


def format_ms(milliseconds: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNIT_MS[unit]
        if milliseconds and milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


@dataclass(frozen=True, order=True)
class ByteSize(_StringValue):
    bytes: int
    text: str = field(default="", compare=False)

    pattern: ClassVar[str] = SIZE_PATTERN
    example: ClassVar[str] = "64MB"
    format_message: ClassVar[str] = (
        "'{value}' is not a size: write a whole number with a unit B, kB, MB, GB or TB (for example 4MB, 1GB)"
    )

    @property
    def kilobytes(self) -> int:
        return self.bytes // 1024

    @property
    def amount(self) -> int:
        return self.bytes

    @classmethod
    def parse(cls, value: Any) -> ByteSize:
        if isinstance(value, ByteSize):
            return value
        text = cls._text_of(value, "size", "expected a size string such as 64MB or 1GB, got '{value}'")
        match = _SIZE_PARTS.fullmatch(text)
        assert match is not None  # the text matched SIZE_PATTERN
        return cls(int(match.group(1)) * _SIZE_UNIT_BYTES[match.group(2)], text)

    @classmethod
    def cel_amount(cls, text: str) -> str:
        units = _cel_map(_SIZE_UNIT_BYTES)
        return f"double({text}.find('^[0-9]+')) * {units}[{text}.find('[A-Za-z]+$')]"

    @classmethod
    def of_bytes(cls, count: int) -> ByteSize:
        for unit in ("TB", "GB", "MB", "kB"):
            size = _SIZE_UNIT_BYTES[unit]
            if count and count % size == 0:
                return cls(count, f"{count // size}{unit}")
        return cls(count, f"{count}B")


def _cel_map(units: dict[str, int]) -> str:
    return "{" + ", ".join(f"{cel.literal(u)}: {cel.number(n)}" for u, n in units.items()) + "}"
