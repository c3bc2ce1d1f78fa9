"""Small builders for the CEL text in the CRDs.

Messages are written once as Python format templates (``"got {value}"``); the
apiserver gets the same words as a ``messageExpression`` that concatenates the
literal parts with CEL expressions for the placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping
from string import Formatter


def literal(text: str) -> str:
    """A CEL string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def number(value: float) -> str:
    """A CEL double literal (sizes and durations are compared as doubles: no int overflow)."""
    return repr(float(value))


def message_expression(template: str, values: Mapping[str, str]) -> str:
    """``template`` as a CEL string expression; ``values`` maps each placeholder to a CEL string expression."""
    parts: list[str] = []
    for text, name, _spec, _conversion in Formatter().parse(template):
        if text:
            parts.append(literal(text))
        if name is not None:
            parts.append(values[name])
    return " + ".join(parts) or literal("")
