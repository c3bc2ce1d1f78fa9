"""Quoting for the statements Postgres cannot parameterise (utility commands).

Identifiers are always double-quoted (quote_ident's rules without its
keyword table: quoting a name that needs none is harmless, missing a keyword is
not). Literals follow quote_literal. Tests round-trip generated input through
the real server, so what is written here is what Postgres parses.
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError("identifiers must be non-empty and cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise ValueError("literals cannot contain NUL")
    if "\\" in value:
        # E'' makes backslash handling explicit whatever standard_conforming_strings says.
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"
