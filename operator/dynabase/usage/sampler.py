"""Measured CPU of each database's Postgres backends, on the database host.

pg_stat_activity names every backend's pid and database; /proc/PID/stat says
how much CPU that process has used (utime + stime, in clock ticks). A sweep
reads both and adds, per backend, what it used since the previous sweep.

First sight of a backend: Postgres forks a new process per connection and a
forked child starts with zero CPU time, so a backend that started inside the
measurement window is counted in full from its first sight (nothing it did is
lost however late the sweep sees it). One that was already running when the
window opened is counted from its first sight only: what it used before belongs
to an earlier window. Backends are keyed by (pid, backend_start) so a reused pid
is a new backend.

What is missed: the CPU a backend uses between its last sweep and its exit, so
sweep often (every second by default) — with PgBouncer in front, server
connections live long and this is small. Autovacuum and parallel workers carry
the database's name and are counted for it, but a parallel worker lives for one
query and is often gone before a sweep sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

BACKENDS_SQL = (
    "SELECT pid, datname, usename, backend_start FROM pg_stat_activity "
    "WHERE datname IS NOT NULL AND pid <> pg_backend_pid()"
)


class NotOnDatabaseHost(RuntimeError):
    """The backends' pids are not this machine's processes."""


def user_system_ticks(stat_line: str) -> tuple[int, int]:
    """utime and stime (fields 14 and 15 of /proc/PID/stat). The command name, field 2,
    is in parentheses and may hold spaces, so fields are counted after its ')'."""
    after_name = stat_line[stat_line.rindex(")") + 2:].split()
    # after_name[0] is field 3 (state): field n is after_name[n - 3].
    return int(after_name[11]), int(after_name[12])


def cpu_ticks(stat_line: str) -> int:
    """utime + stime of /proc/PID/stat."""
    user, system = user_system_ticks(stat_line)
    return user + system


@dataclass
class _Backend:
    database: str
    ticks: int


@dataclass
class BackendCpuSampler:
    dsn: str
    proc: Path = Path("/proc")
    clock_ticks: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK"))
    seconds_by_database: dict[str, float] = field(default_factory=dict)
    sweeps: int = 0
    _backends: dict[tuple[int, dt.datetime], _Backend] = field(default_factory=dict)
    _window_start: dt.datetime | None = None
    _conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        """Open the window: connect, check we share the host's processes, take a baseline."""
        self._conn = await asyncpg.connect(self.dsn)
        own_pid = await self._conn.fetchval("SELECT pg_backend_pid()")
        if not self._is_postgres(own_pid):
            await self.close()
            raise NotOnDatabaseHost(
                f"backend pid {own_pid} is not a postgres process here: run the sampler on the database host"
            )
        self._window_start = await self._conn.fetchval("SELECT now()")
        await self.sweep()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _is_postgres(self, pid: int) -> bool:
        try:
            return (self.proc / str(pid) / "cmdline").read_bytes().startswith(b"postgres")
        except OSError:
            return False

    def _read_ticks(self, pid: int) -> int | None:
        try:
            return cpu_ticks((self.proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            return None  # exited since pg_stat_activity listed it

    async def sweep(self) -> None:
        assert self._conn is not None and self._window_start is not None, "start() first"
        rows = await self._conn.fetch(BACKENDS_SQL)
        seen: set[tuple[int, dt.datetime]] = set()
        for row in rows:
            key = (row["pid"], row["backend_start"])
            ticks = self._read_ticks(row["pid"])
            if ticks is None:
                continue
            seen.add(key)
            known = self._backends.get(key)
            if known is None:
                started_inside = row["backend_start"] >= self._window_start
                known = self._backends[key] = _Backend(row["datname"], 0 if started_inside else ticks)
            delta = ticks - known.ticks
            if delta > 0:
                self.seconds_by_database[known.database] = (
                    self.seconds_by_database.get(known.database, 0.0) + delta / self.clock_ticks
                )
            known.ticks = ticks
        for gone in set(self._backends) - seen:
            del self._backends[gone]
        self.sweeps += 1

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Sweep every interval until ``stop``; the last sweep begins after it, so nothing burnt
        before the stop is missed (a sweep under way when it came may have read /proc earlier)."""
        while True:
            stopping = stop.is_set()
            await self.sweep()
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
