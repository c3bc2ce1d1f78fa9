"""A Postgres of its own, from initdb in a temp dir, for tests that edit pg_hba.conf or need an
empty cluster (the session devstack is shared by every test and must stay as it is)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from dynabase.devstack.stack import Devstack


@dataclass
class FreshPostgres:
    devstack: Devstack
    dsn: str

    @property
    def hba_file(self) -> Path:
        return self.devstack.root / "postgres" / "data" / "pg_hba.conf"

    def write_hba(self, text: str) -> None:
        """Replace pg_hba.conf (the file keeps its owner) and wait until the server has loaded it."""
        self.hba_file.write_text(text)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            before = conn.execute("SELECT pg_conf_load_time()").fetchone()
            conn.execute("SELECT pg_reload_conf()")
        # The postmaster reloads when it gets to the signal; a new session shows when it did.
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                if conn.execute("SELECT pg_conf_load_time()").fetchone() != before:
                    return
            if time.monotonic() > deadline:
                raise AssertionError("Postgres did not reload its configuration within 30s")
            time.sleep(0.05)


@contextlib.contextmanager
def fresh_postgres() -> Iterator[FreshPostgres]:
    # Not pytest's tmp_path: its 0700 parents keep the postgres user out when run as root.
    root = Path(tempfile.mkdtemp(prefix="dynabase-fresh-pg-"))
    devstack = Devstack(root)
    try:
        devstack.up(["postgres"], build=False)
        yield FreshPostgres(devstack, devstack.env()["DYNABASE_POSTGRES_DSN"])
    finally:
        devstack.down()
        shutil.rmtree(root, ignore_errors=True)
