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

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"
SIZE_PATTERN = r"^[0-9]+(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)$"

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
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
    """Shared pydantic plumbing: parse from str, serialize back to the text."""

    pattern: ClassVar[str]
    example: ClassVar[str]
    text: str

    @classmethod
    def parse(cls, value: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

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
        # maxLength bounds the cost of CEL rules that read the string.
        return {"type": "string", "pattern": cls.pattern, "maxLength": 32}

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, order=True)
class Duration(_StringValue):
    milliseconds: int
    # Equal durations compare equal however they were written (60s == 1m).
    text: str = field(default="", compare=False)

    pattern: ClassVar[str] = DURATION_PATTERN
    example: ClassVar[str] = "30s"

    @property
    def seconds(self) -> float:
        return self.milliseconds / 1000

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, Duration):
            return value
        if isinstance(value, bool) or not isinstance(value, str):
            raise PydanticCustomError(
                "duration_type",
                "expected a duration string such as 10s, 5m or 1h30m, got '{value}'",
                {"value": value},
            )
        text = value.strip()
        if len(text) > 32 or not re.fullmatch(DURATION_PATTERN, text):
            raise PydanticCustomError(
                "duration_format",
                "'{value}' is not a duration: write a number with a unit ms, s, m, h or d "
                "(for example 10s, 5m, 1h30m)",
                {"value": value},
            )
        total = sum(int(n) * _DURATION_UNIT_MS[u] for n, u in _DURATION_PART.findall(text))
        return cls(total, text)

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

    @property
    def kilobytes(self) -> int:
        return self.bytes // 1024

    @classmethod
    def parse(cls, value: Any) -> ByteSize:
        if isinstance(value, ByteSize):
            return value
        if isinstance(value, bool) or not isinstance(value, str):
            raise PydanticCustomError(
                "size_type",
                "expected a size string such as 64MB or 1GB, got '{value}'",
                {"value": value},
            )
        text = value.strip()
        match = re.fullmatch(r"([0-9]+)(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)", text)
        if not match:
            raise PydanticCustomError(
                "size_format",
                "'{value}' is not a size: write a whole number with a unit B, kB, MB, GB or TB "
                "(for example 4MB, 1GB)",
                {"value": value},
            )
        return cls(int(match.group(1)) * _SIZE_UNIT_BYTES[match.group(2)], text)

    @classmethod
    def of_bytes(cls, count: int) -> ByteSize:
        for unit in ("TB", "GB", "MB", "kB"):
            size = _SIZE_UNIT_BYTES[unit]
            if count and count % size == 0:
                return cls(count, f"{count // size}{unit}")
        return cls(count, f"{count}B")
