"""Command-line options that default to environment variables.

A platform that runs the image without a shell (Railway's start command, a
Kubernetes ``args`` list) cannot expand ``${PORT}`` into a flag, so every option a
deployment sets reads its variable when the flag is absent. The variable is read
after parsing, for the chosen command only: a bad value elsewhere never breaks
``--help`` or another command, and the error names the variable, the value and
the fix.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .settings import SettingsError, env_text, from_env

EXIT_OK, EXIT_INVALID, EXIT_CHANGES = 0, 1, 2  # EXIT_CHANGES: `plan` found something to do


@dataclass(frozen=True)
class EnvDefault:
    flag: str
    variable: str
    parse: Callable[[str], Any]
    default: Any = None
    example: str | None = None
    required: bool = False
    # A default worked out when needed (e.g. from $PORT, or a folder under $HOME).
    fallback: Callable[[], Any] | None = None


class Command:
    """One subcommand's parser; `option` adds a flag with its variable, `done` registers the handler."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.env: dict[str, EnvDefault] = {}

    def option(self, flag: str, *, env: str, help: str, parse: Callable[[str], Any] = str,
               default: Any = None, default_text: str | None = None, example: str | None = None,
               required: bool = False, fallback: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        shown = default_text if default_text is not None else (
            None if default in (None, "", []) else str(default))
        suffix = "required" if required else f"default {shown}" if shown else "default unset"
        text = f"{help} [${env}; {suffix}]"
        if kwargs.get("action") != "append" and parse is not str:
            kwargs["type"] = flag_type(parse)
        action = self.parser.add_argument(flag, default=None, help=text, **kwargs)
        self.env[action.dest] = EnvDefault(flag, env, parse, default, example, required, fallback)

    def done(self, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        self.parser.set_defaults(func=func, env_defaults=self.env)
        return self.parser


def flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its "expected …" message becomes argparse's error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def resolve_env_defaults(args: argparse.Namespace) -> None:
    """Fill every option left unset from its variable (or its default); raises SettingsError."""
    for dest, spec in getattr(args, "env_defaults", {}).items():
        if getattr(args, dest) is not None:
            continue
        if env_text(spec.variable) is not None:
            value = from_env(spec.variable, spec.parse, spec.default, example=spec.example)
        else:
            value = spec.fallback() if spec.fallback is not None else spec.default
        if value is None and spec.required:
            raise SettingsError(f"{spec.flag} is required: pass it or set {spec.variable}")
        setattr(args, dest, value)


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    parse.__name__ = "choice"
    return parse


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an empty host means every address)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8080")
    return host or "0.0.0.0", int(port)
