"""Which sessions end when a tenant is over a lowered connection cap: idle ones first, then the
newest, so work in flight and long-lived sessions are the last to go. Pure.

The proxy applies it to its client connections (``over_cap``); Postgres to its sessions, in
SQL (``ORDER_SQL``, over pg_stat_activity's columns). The two say the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

ORDER_SQL = "state = 'idle' DESC, backend_start DESC"


def over_cap(sessions: Iterable[T], cap: int, *, idle: Callable[[T], bool], started: Callable[[T], float]) -> list[T]:
    """The sessions to end so that ``cap`` remain, in the order they end."""
    ordered = sorted(sessions, key=lambda s: (not idle(s), -started(s)))
    return ordered[: max(0, len(ordered) - cap)]
