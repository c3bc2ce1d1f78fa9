"""Settings from the environment: parsers, secrets from ``*_FILE`` variables and the folders DynaBase writes.

The bottom layer: it imports nothing from DynaBase, so every entry point and
backend can use it. A bad value raises `SettingsError` naming the variable, the
value (never a secret's) and what to write instead. An empty variable counts as
unset, as a shell's ``VAR=`` or a blank Railway variable means.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Environ = Mapping[str, str]


class SettingsError(ValueError):
    """A setting that cannot be used; the message is for the person deploying."""


# -- parsers: text -> value, raising ValueError("expected ...") --------------------------------------

def parse_int(text: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number{_range(minimum, maximum)}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"expected a whole number{_range(minimum, maximum)}")
    return value


def parse_port(text: str) -> int:
    """A TCP port; 0 where the caller documents it as "off"."""
    return parse_int(text, minimum=0, maximum=65535)


def parse_float(text: str, *, minimum: float | None = None) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number{_range(minimum, None)}") from None
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ValueError(f"expected a number{_range(minimum, None)}")
    return value


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``10m``, ``1h30m`` or ``500ms``."""
    compact = text.strip().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise ValueError("expected a duration such as 30, 30s, 10m, 1h30m or 500ms") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a duration such as 30, 30s, 10m, 1h30m or 500ms")
    return seconds


def parse_list(text: str) -> list[str]:
    """Comma-separated words; blanks dropped."""
    return [word.strip() for word in text.split(",") if word.strip()]


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return f" of at most {maximum}" if maximum is not None else ""


# -- reading variables ---------------------------------------------------------------------------------

def env_text(name: str, environ: Environ | None = None) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    return raw or None


def from_env(name: str, parse: Callable[[str], T], default: T, *, example: str | None = None,
             environ: Environ | None = None) -> T:
    """``parse`` applied to the variable, ``default`` when it is unset or blank."""
    raw = env_text(name, environ)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise SettingsError(bad_value(name, raw, str(exc), example, default)) from None


def bad_value(name: str, raw: str, problem: str, example: str | None = None, default: object = None) -> str:
    fix = f"e.g. {name}={example}" if example else f"fix {name}"
    unset = f", or unset it for the default ({default})" if default not in (None, "", []) else ""
    return f"{name}={raw!r}: {problem}; {fix}{unset}"


def env_str(name: str, default: str | None = None, environ: Environ | None = None) -> str | None:
    value = env_text(name, environ)
    return default if value is None else value


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
            environ: Environ | None = None) -> int:
    return from_env(name, lambda text: parse_int(text, minimum=minimum, maximum=maximum), default,
                    example=str(default), environ=environ)


def env_float(name: str, default: float, *, minimum: float | None = None, environ: Environ | None = None) -> float:
    return from_env(name, lambda text: parse_float(text, minimum=minimum), default, example=f"{default:g}",
                    environ=environ)


def env_bool(name: str, default: bool, environ: Environ | None = None) -> bool:
    return from_env(name, parse_bool, default, example="true" if not default else "false", environ=environ)


def env_duration(name: str, default: float, environ: Environ | None = None) -> float:
    """Seconds; the variable may say ``30``, ``30s`` or ``10m``."""
    return from_env(name, parse_duration, default, example="30s", environ=environ)


def env_list(name: str, environ: Environ | None = None) -> list[str]:
    return from_env(name, parse_list, [], example="a,b", environ=environ)


def secret_from_env(name: str, environ: Environ | None = None) -> str | None:
    """A secret from ``NAME``, or from the file named by ``NAME_FILE`` (a mounted Secret, a Docker secret).

    Errors name the variables and the file, never the secret.
    """
    value, path = env_text(name, environ), env_text(f"{name}_FILE", environ)
    if value is not None and path is not None:
        raise SettingsError(f"{name} and {name}_FILE are both set: keep one of them")
    if path is None:
        return value
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise SettingsError(f"{name}_FILE={path}: cannot read it ({exc.strerror}); mount the file there, "
                            f"or set {name} instead") from None


# -- folders ---------------------------------------------------------------------------------------------

def _xdg(variable: str, fallback: str, environ: Environ | None) -> Path:
    # The XDG spec: a relative (or empty) value is invalid and must be ignored, never the working directory.
    base = env_text(variable, environ)
    if base is not None and os.path.isabs(base):
        return Path(base)
    home = env_text("HOME", environ) if environ is not None else None
    expanded = fallback.replace("~", home, 1) if home else os.path.expanduser(fallback)
    if not os.path.isabs(expanded):  # no HOME and no passwd entry (an image's numeric user)
        raise SettingsError(f"no home folder for {fallback}: set HOME, or {variable} to an absolute path")
    return Path(expanded)


def cache_dir(environ: Environ | None = None) -> Path:
    """What can be rebuilt (git clones, built binaries): ``$DYNABASE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynabase``."""
    explicit = env_text("DYNABASE_CACHE_DIR", environ)
    return Path(explicit) if explicit else _xdg("XDG_CACHE_HOME", "~/.cache", environ) / "dynabase"


def data_dir(environ: Environ | None = None) -> Path:
    """What must survive (tenant passwords kept in files): ``$XDG_DATA_HOME/dynabase``."""
    return _xdg("XDG_DATA_HOME", "~/.local/share", environ) / "dynabase"


def state_dir(environ: Environ | None = None) -> Path:
    """Working files a process recreates (the agent's PgBouncer configs): ``$XDG_STATE_HOME/dynabase``."""
    return _xdg("XDG_STATE_HOME", "~/.local/state", environ) / "dynabase"


# -- the platform's Postgres schema ----------------------------------------------------------------------

# Every component creating objects in schema ``dynabase`` (the backends with asyncpg, the Stripe ledgers with
# psycopg) takes this advisory lock around its DDL: ``CREATE … IF NOT EXISTS`` is not safe against itself.
PLATFORM_SCHEMA_LOCK = 0x64796E617363686D  # "dynaschm"

# The warm pool (backends/warm_pool.py): one filler at a time (a bigint key), and per pool database a claim
# lock keyed (this class, the database's oid) in the two-int4 key space, which single keys never meet.
WARM_POOL_FILL_LOCK = 0x64796E61706F6F6C  # "dynapool"
WARM_POOL_CLAIM_LOCK = 0x64706F6F  # "dpoo"
