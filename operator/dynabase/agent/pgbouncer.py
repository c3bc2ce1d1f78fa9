"""`dynabase pgbouncer-agent`: runs beside PgBouncer (same pod / Railway service).

PgBouncer cannot be configured per database over the network, so the engine
publishes the desired pool layout to Redis and this agent renders it locally:
one PgBouncer process per tier pool, config written atomically (temp file +
rename), RELOAD through the admin console only for pools whose file changed,
then SHOW CONFIG / SHOW DATABASES to confirm the live values. The result is
reported back to Redis, where the engine turns it into PgBouncerReady.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis.asyncio as aioredis

from dynabase.desired.pgbouncer import DEFAULT_POOL, AgentConfig, PgBouncerDesired, PoolSettings, render_ini
from dynabase.desired.scram import scram_verifier
from dynabase.keyspace import AGENTS_KEY, LAYOUT_CHANNEL, LAYOUT_KEY, AgentReport, PoolReport, encode_agent_report
from dynabase.stopping import stop_on_signals

log = logging.getLogger(__name__)

SERVICE_USER = "postgres"


def default_pool() -> PoolSettings:
    return PoolSettings()  # the declared defaults


@dataclass
class PoolProcess:
    name: str
    port: int
    ini: Path
    process: subprocess.Popen[bytes] | None = None
    adopted: int | None = None  # pid of a PgBouncer an earlier agent process started, still serving

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.adopted is not None and _alive(self.adopted)


class PgBouncerAgent:
    def __init__(
        self,
        *,
        redis_url: str,
        workdir: Path,
        postgres_host: str,
        postgres_port: int,
        admin_password: str,
        base_port: int,
        agent_id: str | None = None,
        listen_host: str = "127.0.0.1",
        auth_user: str = "dynabase_pgbouncer",
        auth_query: str = "SELECT usename, passwd FROM dynabase_pgbouncer.lookup($1)",
        admin_user: str = "dynabase_admin",
        pgbouncer_binary: str | None = None,
    ) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.workdir = workdir
        self.base_port = base_port
        self.agent_id = agent_id or f"{socket.gethostname()}:{base_port}"
        self.admin_user = admin_user
        self._admin_password = admin_password
        self.binary = pgbouncer_binary or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.config = AgentConfig(
            listen_host=listen_host, postgres_host=postgres_host, postgres_port=postgres_port,
            auth_user=auth_user, auth_query=auth_query, auth_file=str(workdir / "userlist.txt"),
            admin_user=admin_user, workdir=str(workdir),
        )
        self.pools: dict[str, PoolProcess] = {}
        self.version: str | None = None
        self.layout: PgBouncerDesired | None = None  # the last layout read from Redis
        self._ports_file = workdir / "ports.json"
        self._as_root = os.geteuid() == 0

    # -- files ------------------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        userlist = self.workdir / "userlist.txt"
        # Only the admin's SCRAM verifier: tenants come through auth_query.
        self._write(userlist, f'"{self.admin_user}" "{scram_verifier(self._admin_password)}"\n', mode=0o600)
        self._chown(self.workdir)

    def _chown(self, path: Path) -> None:
        if self._as_root:
            entry = pwd.getpwnam(SERVICE_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _write(self, path: Path, text: str, *, mode: int = 0o644) -> bool:
        """Atomic write (temp file + rename); False when the content is already there."""
        if path.exists() and path.read_text() == text:
            return False
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        self._chown(tmp)
        tmp.replace(path)
        return True

    def _ports(self) -> dict[str, int]:
        if self._ports_file.exists():
            return {k: int(v) for k, v in json.loads(self._ports_file.read_text()).items()}
        return {}

    def _port_for(self, pool: str, ports: dict[str, int]) -> int:
        if pool == DEFAULT_POOL:
            return self.base_port
        if pool not in ports:
            used = set(ports.values()) | {self.base_port}
            port = self.base_port + 1
            while port in used or not self._port_free(port):
                port += 1
            ports[pool] = port
        return ports[pool]

    def _port_free(self, port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind((self.config.listen_host, port))
            except OSError:
                return False
            return True

    # -- processes --------------------------------------------------------------

    def _spawn(self, pool: PoolProcess) -> None:
        kwargs: dict[str, Any] = {}
        if self._as_root:  # PgBouncer refuses to run as root
            entry = pwd.getpwnam(SERVICE_USER)
            kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        log_file = open(self.workdir / f"{pool.name}.log", "ab")  # noqa: SIM115 - owned by the child
        pool.process = subprocess.Popen(
            [self.binary, str(pool.ini)], stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, **kwargs,
        )
        log_file.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pool.process.poll() is not None:
                raise RuntimeError(f"pgbouncer for pool {pool.name} exited with {pool.process.returncode}")
            with socket.socket() as sock:
                if sock.connect_ex((self.config.listen_host, pool.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer for pool {pool.name} did not listen on {pool.port}")

    def _admin(self, pool: PoolProcess) -> psycopg.Connection[Any]:
        # The admin console speaks only the simple query protocol: ClientCursor.
        return psycopg.connect(
            host=self.config.listen_host, port=pool.port, dbname="pgbouncer", user=self.admin_user,
            password=self._admin_password, autocommit=True, cursor_factory=psycopg.ClientCursor,
            connect_timeout=5,
        )

    def _reload(self, pool: PoolProcess) -> None:
        with self._admin(pool) as conn:
            conn.execute("RELOAD")

    def _confirm(self, pool: PoolProcess, desired: PgBouncerDesired) -> PoolReport:
        settings = desired.pools.get(pool.name) or default_pool()
        mismatches: list[str] = []
        with self._admin(pool) as conn:
            config = {row[0]: row[1] for row in conn.execute("SHOW CONFIG").fetchall()}
            for key, value in settings.pairs("ini"):
                if config.get(key) != value:
                    mismatches.append(f"{key} is {config.get(key)!r}, want {value!r}")
            cursor = conn.execute("SHOW DATABASES")
            columns = [d.name for d in cursor.description or []]
            live = {row[0]: dict(zip(columns, row, strict=False)) for row in cursor.fetchall()}
        for route in desired.explicit_routes(pool.name):
            assert route.settings is not None
            row = live.get(route.database)
            if row is None:
                mismatches.append(f"database {route.database} missing")
                continue
            for column, want in route.settings.pairs("shown"):
                if str(row.get(column)) != want:
                    mismatches.append(f"{route.database}.{column} is {row.get(column)!r}, want {want!r}")
        return PoolReport(pool.port, not mismatches, mismatches)

    def _adopt(self, pool: PoolProcess) -> bool:
        """A PgBouncer of this pool left running by an agent that died (its pidfile names a live
        pgbouncer): adopted and reloaded, not replaced, so its clients keep their connections."""
        pidfile = self.workdir / f"{pool.name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return False
        if comm != "pgbouncer" or not _alive(pid):
            return False
        pool.adopted = pid
        log.info("adopted a running pgbouncer", extra={"pool": pool.name, "pid": pid})
        return True

    def _stop(self, pool: PoolProcess) -> None:
        if pool.adopted is not None and pool.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pool.adopted, signal.SIGINT)  # safe shutdown, as below
            deadline = time.monotonic() + 10
            while pool.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pool.adopted, signal.SIGKILL)
            return
        if pool.process is not None and pool.process.poll() is None:
            pool.process.send_signal(signal.SIGINT)  # safe shutdown: wait for servers to be released
            try:
                pool.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pool.process.kill()
                pool.process.wait()

    # -- the loop -----------------------------------------------------------------

    def converge(self, desired: PgBouncerDesired) -> dict[str, PoolReport]:
        """Blocking: render, start or reload, confirm. Returns a report per pool."""
        desired.pools.setdefault(DEFAULT_POOL, default_pool())
        ports = self._ports()
        reports: dict[str, PoolReport] = {}
        for name in sorted(desired.pools):
            port = self._port_for(name, ports)
            pool = self.pools.setdefault(name, PoolProcess(name, port, self.workdir / f"{name}.ini"))
            changed = self._write(pool.ini, render_ini(desired, name, port, self.config))
            try:
                if pool.process is None and pool.adopted is None and self._adopt(pool):
                    self._reload(pool)  # its file may have changed while no agent watched
                elif not pool.running():
                    pool.adopted = None
                    self._spawn(pool)
                elif changed:
                    self._reload(pool)
                reports[name] = self._confirm(pool, desired)
            except Exception as exc:  # one pool's failure is reported, the others go on
                log.warning("pgbouncer pool failed", extra={"pool": name, "error": str(exc)})
                reports[name] = PoolReport(port, False, [f"{type(exc).__name__}: {exc}"])
        self._write(self._ports_file, json.dumps(ports, sort_keys=True))
        for name in [n for n in self.pools if n not in desired.pools]:
            self._stop(self.pools.pop(name))
        return reports

    async def sync_once(self) -> None:
        text = await self.redis.get(LAYOUT_KEY)
        if text:
            desired = self.layout = PgBouncerDesired.from_json(str(text))
        elif self.layout is not None:
            # Redis lost the layout (restarted without its data): that says nothing about the pools,
            # so the last one stays, and is reported as confirming nothing until one is published.
            desired = dataclasses.replace(self.layout, seq=0)
        else:
            desired = PgBouncerDesired()  # nothing published yet: the default pool only
        reports = await asyncio.to_thread(self.converge, desired)
        self.version = desired.version
        report = AgentReport(self.agent_id, desired.version, time.time(), desired.seq, reports)
        await self.redis.hset(AGENTS_KEY, self.agent_id, encode_agent_report(report))

    async def run(self, stop: asyncio.Event, *, interval: float = 1.0) -> None:
        self._prepare()
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(LAYOUT_CHANNEL)
        try:
            while not stop.is_set():
                try:
                    await self.sync_once()
                except Exception as exc:  # Redis or disk trouble: keep serving, retry next tick
                    log.warning("pgbouncer agent sync failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                # A publish wakes us at once; otherwise re-check (and heartbeat) every interval.
                with contextlib.suppress(Exception):
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=interval)
        finally:
            for pool in list(self.pools.values()):
                self._stop(pool)
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await self.redis.aclose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie answers kill(0) too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


async def run_agent(agent: PgBouncerAgent) -> None:
    await agent.run(stop_on_signals())
