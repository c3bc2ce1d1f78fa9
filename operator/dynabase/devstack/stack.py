"""The real local stack: Postgres, PgBouncer, Redis, etcd + kube-apiserver, FerretDB.

Every server is a real binary started on free loopback ports inside one
directory; ``state.json`` there records pids, ports and the generated admin
credentials so ``devstack env`` and ``devstack down`` work from another process.
Postgres and PgBouncer refuse to run as root, so when we are root they run as
the ``postgres`` system user that Debian's postgresql package creates.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from dynabase.desired.postgres import PGBOUNCER_AUTH_ROLE

from . import binaries, pki
from .processes import (
    SERVICE_USER,
    DevstackError,
    Processes,
    Service,
    State,
    pg_ready,
    port_open,
    postgres_bindir,
    require,
)

ALL_SERVICES = ("postgres", "redis", "pgbouncer", "etcd", "kube-apiserver", "ferretdb")
SERVICE_GROUPS = {"kube": ("etcd", "kube-apiserver"), "mongo": ("ferretdb",)}
PG_SUPERUSER = "postgres"
PGBOUNCER_ADMIN = "dynabase_admin"
MONGO_ADMIN = "dynabase"


def _progress(message: str) -> None:
    print(f"[devstack] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Devstack(Processes):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.state_file = self.root / "state.json"
        self.state = State(str(self.root))
        if self.state_file.exists():
            self.state = State.from_json(self.state_file.read_text())
        self._as_root = os.geteuid() == 0

    # -- public ---------------------------------------------------------------

    def up(self, services: Iterable[str] = ALL_SERVICES, *, build: bool = True) -> State:
        wanted = [s for s in ALL_SERVICES if s in set(services)]
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if self._as_root and {"postgres", "pgbouncer"} & set(wanted):
            self._check_traversable()
        starters: dict[str, Callable[[], Service]] = {
            "postgres": self._start_postgres,
            "pgbouncer": self._start_pgbouncer,
            "redis": self._start_redis,
            "etcd": self._start_etcd,
            "kube-apiserver": self._start_kube_apiserver,
            "ferretdb": self._start_ferretdb,
        }
        if build:
            needed = {"etcd": binaries.ETCD, "kube-apiserver": binaries.KUBE_APISERVER,
                      "ferretdb": binaries.FERRETDB}
            for name in wanted:
                if name in needed:
                    binaries.ensure(needed[name])
                    if name == "kube-apiserver":
                        binaries.ensure(binaries.KUBECTL)
        try:
            for name in wanted:
                if name in self.state.services and self._alive(self.state.services[name].pid):
                    _progress(f"{name}: already running")
                    continue
                started = time.monotonic()
                service = starters[name]()
                self.state.services[name] = service
                self._save()
                _progress(f"{name}: ready on 127.0.0.1:{service.port} ({time.monotonic() - started:.1f}s)")
        except BaseException:
            self.down()
            raise
        return self.state

    def down(self) -> None:
        for name in reversed(ALL_SERVICES):
            service = self.state.services.pop(name, None)
            if service is None:
                continue
            self._stop(service)
            _progress(f"{name}: stopped")
        if self.state_file.exists():
            self._save()

    def stop(self, name: str, *, kill: bool = False) -> None:
        """Stop one service (``kill``: SIGKILL to its process group, as a crash would) and keep its
        port, data and credentials, so ``start`` brings it back where clients expect it."""
        service = self.state.services.get(name)
        if service is None:
            raise DevstackError(f"{name} is not part of this devstack")
        if kill:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.pid, signal.SIGKILL)
        self._stop(service)
        _progress(f"{name}: {'killed' if kill else 'stopped'}")

    def start(self, name: str) -> Service:
        """Start a stopped service again on the port it had."""
        self.up([name], build=False)
        return self.state.services[name]

    def _port(self, name: str) -> int:
        """The port a service had (a restart keeps it), or a free one."""
        known = self.state.services.get(name)
        return known.port if known is not None else free_port()

    def env(self) -> dict[str, str]:
        s = self.state.services
        sec = self.state.secrets
        out: dict[str, str] = {"DYNABASE_DEVSTACK_DIR": str(self.root)}
        if "postgres" in s:
            port = s["postgres"].port
            out.update(
                {
                    "DYNABASE_POSTGRES_DSN": f"postgresql://{PG_SUPERUSER}:{sec['postgres']}@127.0.0.1:{port}/postgres",
                    "PGHOST": "127.0.0.1",
                    "PGPORT": str(port),
                    "PGUSER": PG_SUPERUSER,
                    "PGPASSWORD": sec["postgres"],
                    "PGDATABASE": "postgres",
                }
            )
        if "pgbouncer" in s:
            port = s["pgbouncer"].port
            out["DYNABASE_PGBOUNCER_HOST"] = "127.0.0.1"
            out["DYNABASE_PGBOUNCER_PORT"] = str(port)
            out["DYNABASE_PGBOUNCER_ADMIN_DSN"] = (
                f"postgresql://{PGBOUNCER_ADMIN}:{sec['pgbouncer_admin']}@127.0.0.1:{port}/pgbouncer"
            )
            out["DYNABASE_PGBOUNCER_DIR"] = s["pgbouncer"].extra["dir"]
        if "redis" in s:
            out["DYNABASE_REDIS_URL"] = f"redis://default:{sec['redis']}@127.0.0.1:{s['redis'].port}/0"
        if "kube-apiserver" in s:
            out["KUBECONFIG"] = s["kube-apiserver"].extra["kubeconfig"]
            out["DYNABASE_KUBECTL"] = s["kube-apiserver"].extra["kubectl"]
        if "ferretdb" in s:
            out["DYNABASE_MONGO_URL"] = (
                f"mongodb://{MONGO_ADMIN}:{sec['mongo']}@127.0.0.1:{s['ferretdb'].port}/"
                "?authSource=admin&authMechanism=SCRAM-SHA-256"
            )
        return out

    # -- process plumbing -------------------------------------------------------

    def _check_traversable(self) -> None:
        """Postgres runs as another user; every parent directory must let it through."""
        for parent in [self.root, *self.root.parents]:
            if not os.stat(parent).st_mode & 0o001:
                raise DevstackError(
                    f"{parent} is not searchable by the '{SERVICE_USER}' user that runs Postgres; "
                    "choose a devstack directory under /tmp (e.g. --dir /tmp/dynabase-devstack)"
                )

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    # -- services ---------------------------------------------------------------

    def _start_postgres(self) -> Service:
        bindir = postgres_bindir()
        base = self._dir("postgres", service_user=True)
        data = base / "data"
        run = self._dir("run", service_user=True)
        password = self.state.secrets.setdefault("postgres", secrets.token_urlsafe(18))
        self._save()
        if not (data / "PG_VERSION").exists():
            pwfile = base / "pwfile"
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            self._chown(pwfile)
            cmd = [str(bindir / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, f"--pwfile={pwfile}",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                   "--locale=C", "--no-sync"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=base,
                                  **self._run_as("initdb"))
            pwfile.unlink()
            if proc.returncode != 0:
                raise DevstackError(f"initdb failed: {proc.stderr.strip()}")
            # Tenants and the engine come over TCP with SCRAM; only the PgBouncer
            # auth_query user may use the local socket without a password.
            (data / "pg_hba.conf").write_text(
                "# dynabase devstack\n"
                f"local all {PG_SUPERUSER} trust\n"
                f"local all {PGBOUNCER_AUTH_ROLE} trust\n"
                "local all all scram-sha-256\n"
                "host all all 127.0.0.1/32 scram-sha-256\n"
                "host all all ::1/128 scram-sha-256\n"
            )
        port = self._port("postgres")
        pid, log = self._spawn(
            "postgres",
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={run}",
             "-c", "max_connections=400", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "shared_buffers=128MB",
             "-c", "password_encryption=scram-sha-256", "-c", "log_min_messages=warning"],
            service_user=True,
            cwd=base,
        )
        self._wait("postgres", pid, log, lambda: port_open(port) and pg_ready(bindir, run, port))
        return Service("postgres", pid, port, log, {"socket_dir": str(run), "bindir": str(bindir)})

    def _start_pgbouncer(self) -> Service:
        """The production path: a pgbouncer-agent that renders what the engine publishes."""
        require("pgbouncer", "pgbouncer")
        pg, redis_service = self.state.services.get("postgres"), self.state.services.get("redis")
        if pg is None or redis_service is None:
            raise DevstackError("pgbouncer needs postgres and redis in the same devstack")
        base = self._dir("pgbouncer", service_user=True)
        admin_password = self.state.secrets.setdefault("pgbouncer_admin", secrets.token_urlsafe(18))
        self._save()
        port = self._port("pgbouncer")
        redis_url = f"redis://default:{self.state.secrets['redis']}@127.0.0.1:{redis_service.port}/0"
        pid, log = self._spawn(
            "pgbouncer",
            [sys.executable, "-m", "dynabase.cli", "pgbouncer-agent", f"--workdir={base}",
             f"--postgres-host={pg.extra['socket_dir']}", f"--postgres-port={pg.port}",
             f"--base-port={port}"],
            # Secrets through the environment, not argv (visible in ps).
            env={"DYNABASE_PGBOUNCER_ADMIN_PASSWORD": admin_password, "DYNABASE_REDIS_URL": redis_url,
                 "DYNABASE_LOG_LEVEL": "INFO"},
        )
        self._wait("pgbouncer", pid, log, lambda: port_open(port))
        return Service("pgbouncer", pid, port, log, {"dir": str(base)})

    def _start_redis(self) -> Service:
        binary = require("redis-server", "redis-server")
        base = self._dir("redis")
        password = self.state.secrets.setdefault("redis", secrets.token_urlsafe(18))
        self._save()
        aclfile = base / "users.acl"
        if not aclfile.exists():
            # The ACL file takes SHA-256 hashes (#...), so no plaintext on disk.
            import hashlib

            digest = hashlib.sha256(password.encode()).hexdigest()
            aclfile.write_text(f"user default on #{digest} ~* &* +@all\n")
            aclfile.chmod(0o600)
        port = self._port("redis")
        conf = base / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {base}\naclfile {aclfile}\n"
            "save \"\"\nappendonly no\ndaemonize no\nprotected-mode yes\nlatency-tracking no\n"
        )
        pid, log = self._spawn("redis", [binary, str(conf)], cwd=base)
        self._wait("redis", pid, log, lambda: port_open(port))
        return Service("redis", pid, port, log, {"aclfile": str(aclfile)})

    def _start_etcd(self) -> Service:
        binary = str(binaries.ensure(binaries.ETCD, build=False))
        base = self._dir("etcd")
        port, peer = free_port(), free_port()
        pid, log = self._spawn(
            "etcd",
            [binary, "--name=devstack", f"--data-dir={base / 'data'}",
             f"--listen-client-urls=http://127.0.0.1:{port}",
             f"--advertise-client-urls=http://127.0.0.1:{port}",
             f"--listen-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-cluster=devstack=http://127.0.0.1:{peer}",
             "--unsafe-no-fsync=true", "--log-level=warn"],
            cwd=base,
        )
        url = f"http://127.0.0.1:{port}/health"
        self._wait("etcd", pid, log, lambda: b"true" in urllib.request.urlopen(url, timeout=1).read())
        return Service("etcd", pid, port, log)

    def _start_kube_apiserver(self) -> Service:
        binary = str(binaries.ensure(binaries.KUBE_APISERVER, build=False))
        kubectl = str(binaries.ensure(binaries.KUBECTL, build=False))
        etcd = self.state.services.get("etcd")
        if etcd is None:
            raise DevstackError("kube-apiserver needs etcd in the same devstack")
        base = self._dir("kube")
        restart = "kube-apiserver" in self.state.services and pki.at(base / "pki").ca_key.exists()
        certs = pki.at(base / "pki") if restart else pki.create(base / "pki")  # clients keep trusting it
        port = self._port("kube-apiserver")
        server = f"https://127.0.0.1:{port}"
        kubeconfig = base / "kubeconfig"
        kubeconfig.write_text(pki.kubeconfig(certs, server))
        kubeconfig.chmod(0o600)
        pid, log = self._spawn(
            "kube-apiserver",
            [binary, f"--etcd-servers=http://127.0.0.1:{etcd.port}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={port}", f"--cert-dir={base / 'pki'}",
             f"--tls-cert-file={certs.serving_cert}", f"--tls-private-key-file={certs.serving_key}",
             f"--client-ca-file={certs.ca_cert}", "--authorization-mode=Node,RBAC",
             "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
             # For devstack/node.py's kubelet: logs and exec as admin; pods get ServiceAccount tokens.
             f"--kubelet-client-certificate={certs.admin_cert}", f"--kubelet-client-key={certs.admin_key}",
             "--kubelet-preferred-address-types=InternalIP",
             f"--service-account-issuer={server}/",
             f"--service-account-key-file={certs.sa_public}",
             f"--service-account-signing-key-file={certs.sa_private}",
             "--v=0"],
            cwd=base,
        )
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        context.load_cert_chain(str(certs.admin_cert), str(certs.admin_key))

        def ready() -> bool:
            with urllib.request.urlopen(f"{server}/readyz", context=context, timeout=2) as resp:
                return bool(resp.status == 200)

        self._wait("kube-apiserver", pid, log, ready, timeout=120)
        return Service("kube-apiserver", pid, port, log,
                       {"kubeconfig": str(kubeconfig), "kubectl": kubectl, "server": server,
                        "pki": str(base / "pki")})

    def _start_ferretdb(self) -> Service:
        binary = str(binaries.ensure(binaries.FERRETDB, build=False))
        base = self._dir("ferretdb")
        (base / "data").mkdir(exist_ok=True)
        password = self.state.secrets.setdefault("mongo", secrets.token_urlsafe(18))
        self._save()
        port = self._port("ferretdb")
        pid, log = self._spawn(
            "ferretdb",
            [binary, "--handler=sqlite", f"--sqlite-url=file:{base / 'data'}/",
             f"--listen-addr=127.0.0.1:{port}", f"--state-dir={base}", "--telemetry=disable",
             f"--debug-addr=127.0.0.1:{free_port()}", "--test-enable-new-auth",
             "--setup-database=admin", f"--setup-username={MONGO_ADMIN}", "--log-level=WARN"],
            # The password goes through the environment, not argv (visible in ps).
            env={"FERRETDB_SETUP_PASSWORD": password},
            cwd=base,
        )
        self._wait("ferretdb", pid, log, lambda: port_open(port))
        return Service("ferretdb", pid, port, log)


def default_root() -> Path:
    return Path(os.environ.get("DYNABASE_DEVSTACK_DIR") or f"/tmp/dynabase-devstack-{os.getuid()}")


def resolve_services(only: str | None, without: str | None) -> list[str]:
    def expand(text: str) -> set[str]:
        out: set[str] = set()
        for item in filter(None, (p.strip() for p in text.split(","))):
            if item in SERVICE_GROUPS:
                out |= set(SERVICE_GROUPS[item])
            elif item in ALL_SERVICES:
                out.add(item)
            else:
                raise DevstackError(
                    f"unknown service {item!r}; choose from {', '.join(ALL_SERVICES)} or "
                    f"{', '.join(SERVICE_GROUPS)}"
                )
        return out

    chosen = expand(only) if only else set(ALL_SERVICES)
    if without:
        chosen -= expand(without)
    if "pgbouncer" in chosen:
        chosen |= {"postgres", "redis"}
    if "kube-apiserver" in chosen:
        chosen.add("etcd")
    return [s for s in ALL_SERVICES if s in chosen]
