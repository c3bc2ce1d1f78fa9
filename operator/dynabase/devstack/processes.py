"""The devstack's processes: started as the service user when we are root, watched until
ready or dead, stopped by process group; and the state file's records of them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE_USER = "postgres"  # Postgres and PgBouncer refuse root; Debian's postgresql package makes this user


class DevstackError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    port: int
    log: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    root: str
    services: dict[str, Service] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "root": self.root,
                "services": {k: vars(v) for k, v in self.services.items()},
                "secrets": self.secrets,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> State:
        raw = json.loads(text)
        return cls(
            root=raw["root"],
            services={k: Service(**v) for k, v in raw["services"].items()},
            secrets=raw["secrets"],
        )


class Processes:
    """Process handling for Devstack: its ``root`` holds each service's folder and log."""

    root: Path
    _as_root: bool

    def _run_as(self, name: str) -> dict[str, Any]:
        """subprocess kwargs that drop to the service user when we are root (else nothing)."""
        if not self._as_root:
            return {}
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError as exc:
            raise DevstackError(
                f"running as root, {name} needs the '{SERVICE_USER}' user: apt-get install postgresql"
            ) from exc
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _dir(self, name: str, *, service_user: bool = False) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        if service_user:
            for p in [path, *path.rglob("*")]:
                self._chown(p)
        return path

    def _chown(self, path: Path) -> None:
        owner = self._run_as(str(path))
        if owner:
            os.chown(path, owner["user"], owner["group"])

    def _spawn(self, name: str, args: list[str], *, service_user: bool = False,
               env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str]:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        kwargs = self._run_as(name) if service_user else {}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                **kwargs,
            )
        return proc.pid, str(log_path)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return False
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie of another parent still answers kill(0); /proc tells.
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        return True

    def _wait(self, name: str, pid: int, log: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(pid):
                raise DevstackError(f"{name} exited during start-up; last log lines:\n{tail(log)}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        raise DevstackError(f"{name} not ready after {timeout:.0f}s; last log lines:\n{tail(log)}")

    def _stop(self, service: Service, timeout: float = 15) -> None:
        sig = signal.SIGINT if service.name == "postgres" else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(service.pid):
            time.sleep(0.05)
        if self._alive(service.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(service.pid, os.WNOHANG)


def tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- finding programs, probing servers ---------------------------------------------------


def postgres_bindir() -> Path:
    explicit = os.environ.get("DYNABASE_PG_BINDIR")
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    raise DevstackError("Postgres not found: apt-get install postgresql (or set DYNABASE_PG_BINDIR)")


def require(command: str, package: str) -> str:
    path = shutil.which(command) or (f"/usr/sbin/{command}" if Path(f"/usr/sbin/{command}").exists() else None)
    if not path:
        raise DevstackError(f"{command} not found: apt-get install {package}")
    return path


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pg_ready(bindir: Path, socket_dir: Path, port: int) -> bool:
    isready = bindir / "pg_isready"
    if not isready.exists():
        return True
    proc = subprocess.run([str(isready), "-h", str(socket_dir), "-p", str(port), "-q"], check=False)
    return proc.returncode == 0
