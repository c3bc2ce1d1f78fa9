"""The image as it is deployed: every mode from `make image`'s dynabase:dev, as uid 10001 with a
read-only root file system, on the host network against the devstack; each stops on SIGTERM.

Containers run like shared/notes/containers.md says they must here: podman with runc (crun
refuses hybrid cgroups) and limits no higher than the shell's. Each test's Redis state lives in
a Redis database of its own, so the layouts its containers publish never reach other tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import redis
import yaml

from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.billing.server import WEBHOOK_PATH
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine

from .conftest import ROOT, Stack, missing_server
from .engine_helpers import example_policy, make_engine, make_tenant, unique
from .manifests import tenant
from .test_webhooks import SECRET as WEBHOOK_SECRET
from .test_webhooks import stripe_signature, subscription_event

IMAGE = os.environ.get("DYNABASE_IMAGE", "localhost/dynabase:dev")
RUNC = "/usr/sbin/runc"
USER = "10001:10001"
GRACE_SECONDS = 10  # what `podman stop` (like Kubernetes and Railway) waits before SIGKILL


def image_unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman not installed (./scripts/setup installs it)"
    if not Path(RUNC).exists():
        return f"{RUNC} not installed (./scripts/setup installs runc)"
    if os.geteuid() != 0:
        return "the image lives in root's container storage here (`make image` runs as root)"
    if subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode != 0:
        return f"{IMAGE} is not built: run `make image`"
    return None


@pytest.fixture(scope="session")
def image() -> str:
    reason = image_unavailable()
    if reason:
        missing_server(f"image tests: {reason}")
    return IMAGE


def redis_url(stack: Stack, database: int) -> str:
    """The devstack's Redis, another database: a container's published state stays in the test."""
    base = stack.env["DYNABASE_REDIS_URL"].rsplit("/", 1)[0]
    return f"{base}/{database}"


@pytest.fixture
def redis_db(stack: Stack) -> Iterator[Callable[[int], str]]:
    used: list[int] = []

    def url(database: int) -> str:
        used.append(database)
        return redis_url(stack, database)

    yield url
    for database in used:
        client = redis.Redis.from_url(redis_url(stack, database))
        client.flushdb()
        client.close()


class Container:
    """One `podman run -d` of the image; environment values go through podman's own environment."""

    def __init__(self, *, entrypoint: list[str] | None = None, command: list[str] | None = None,
                 env: dict[str, str], volumes: tuple[str, ...] = (), hostname: str | None = None) -> None:
        self.name = f"dynabase-test-{uuid.uuid4().hex[:8]}"
        # No --user: the image's own USER is what a platform runs.
        args = ["podman", "--runtime", RUNC, "run", "-d", "--name", self.name, "--read-only",
                "--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1000:1000",
                "--hostname", hostname or self.name]
        if entrypoint is not None:
            args += ["--entrypoint", json.dumps(entrypoint)]
        for name in env:
            args += ["--env", name]  # the value comes from podman's environment, not argv
        for volume in volumes:
            args += ["--volume", volume]
        args += [IMAGE, *(command or [])]
        proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr

    def inspect(self) -> dict[str, Any]:
        out = subprocess.run(["podman", "inspect", self.name], capture_output=True, text=True, check=True).stdout
        return dict(json.loads(out)[0])

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        proc = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True, check=False)
        return proc.stdout + proc.stderr

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            assert self.running(), f"{self.name} exited while waiting for {what}:\n{self.logs()[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what} after {timeout:.0f}s:\n{self.logs()[-4000:]}")

    def terminate(self) -> int:
        """SIGTERM, then SIGKILL after the grace period (exit code 137) as platforms do; the exit code."""
        subprocess.run(["podman", "stop", "--time", str(GRACE_SECONDS), self.name], capture_output=True,
                       check=True)
        return int(self.inspect()["State"]["ExitCode"])

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "--force", "--volumes", self.name], capture_output=True, check=False)


@pytest.fixture
def containers() -> Iterator[Callable[..., Container]]:
    started: list[Container] = []

    def start(**kwargs: Any) -> Container:
        container = Container(**kwargs)
        started.append(container)
        return container

    yield start
    for container in started:
        container.remove()


def assert_stops_cleanly(container: Container) -> None:
    code = container.terminate()
    assert code == 0, f"{container.name} exited {code} on SIGTERM (137: killed after {GRACE_SECONDS}s):\n" \
                      f"{container.logs()[-4000:]}"


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def owned_by_image_user(path: Path) -> None:
    uid, gid = (int(x) for x in USER.split(":"))
    for item in [path, *path.rglob("*")]:
        os.chown(item, uid, gid, follow_symlinks=False)


def git(*args: str, cwd: Path) -> str:
    # safe.directory: the repositories belong to the image's user, not to the test.
    identity = ["-c", "safe.directory=*", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def gitops_repository(tmp_path: Path, *, bare: bool = False) -> Path:
    """The example GitOps repository on main, owned by the image's user (git refuses others' repositories)."""
    seed = tmp_path / "gitops"
    shutil.copytree(ROOT / "examples" / "gitops", seed)
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", ".", cwd=seed)
    git("commit", "-q", "-m", "tenants", cwd=seed)
    repo = seed
    if bare:
        repo = tmp_path / "gitops.git"
        git("clone", "-q", "--bare", str(seed), str(repo), cwd=tmp_path)
    owned_by_image_user(repo)
    return repo


def railway_start_command() -> list[str]:
    """railway.toml's startCommand as Railway runs a Dockerfile service's: split into words, no shell."""
    deploy = tomllib.loads((ROOT / "railway.toml").read_text())["deploy"]
    return shlex.split(deploy["startCommand"])


def role_passwords(stack: Stack, roles: list[str]) -> dict[str, str]:
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        rows = conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (roles,)).fetchall()
    return {str(name): str(password) for name, password in rows}


def example_gitops_tenants() -> dict[str, str]:
    """TenantDatabase key -> role name of the examples/gitops tenants."""
    out = {}
    for path in sorted((ROOT / "examples" / "gitops" / "tenants").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        name = doc["metadata"]["name"]
        out[f"{doc['metadata']['namespace']}/{name}"] = doc["spec"].get("databaseName", name.replace("-", "_"))
    return out


def pgbouncer_agent(stack: Stack, containers: Callable[..., Container], layout: str) -> tuple[Container, str]:
    """`dynabase pgbouncer-agent` rendering the layout published at ``layout``; (container, agent id)."""
    pg = stack.devstack.state.services["postgres"]
    base_port = free_port()
    hostname = f"agent-{uuid.uuid4().hex[:6]}"
    agent = containers(command=["dynabase", "pgbouncer-agent"], hostname=hostname, env={
        "DYNABASE_REDIS_URL": layout,
        "DYNABASE_PGBOUNCER_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        # The auth_query role logs in over the devstack's Unix socket (pg_hba: local trust).
        "DYNABASE_PGBOUNCER_UPSTREAM_HOST": "/run/postgresql",
        "DYNABASE_PGBOUNCER_UPSTREAM_PORT": str(pg.port),
        "DYNABASE_PGBOUNCER_BASE_PORT": str(base_port),
    }, volumes=(f"{pg.extra['socket_dir']}:/run/postgresql",))
    return agent, f"{hostname}:{base_port}"


def test_non_root_with_all_state_in_one_volume_on_a_read_only_root(image: str) -> None:
    config = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True,
                                       check=True).stdout)[0]["Config"]
    assert config["User"] == USER and list(config["Volumes"]) == ["/var/lib/dynabase"]
    assert not config.get("Entrypoint"), "Railway's start command replaces the ENTRYPOINT: keep it empty"
    probe = ("id -u; echo $HOME; git --version >/dev/null && pgbouncer --version >/dev/null && echo tools; "
             "touch $HOME/x $XDG_CACHE_HOME/x $XDG_STATE_HOME/x $TMPDIR/x && echo writable; "
             "touch /opt/dynabase/x 2>/dev/null || echo read-only")
    out = subprocess.run(["podman", "--runtime", RUNC, "run", "--rm", "--read-only", "--network", "none",
                          "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1000:1000", image, "sh", "-c", probe],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["10001", "/var/lib/dynabase", "tools", "writable", "read-only"]


def test_headless_as_railway_starts_it_and_a_fresh_replica_keeps_every_password(
        image: str, stack: Stack, containers: Callable[..., Container], redis_db: Callable[[int], str],
        tmp_path: Path) -> None:
    stack.need("postgres", "redis")
    command = railway_start_command()
    assert command[:2] == ["dynabase", "headless"], command
    repo = gitops_repository(tmp_path)
    env = {
        "DYNABASE_GITOPS_URL": "file:///srv/gitops",
        "DYNABASE_POSTGRES_DSN": stack.env["DYNABASE_POSTGRES_DSN"],
        "DYNABASE_REDIS_URL": redis_db(1),
        "DYNABASE_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "DYNABASE_INTERVAL": "2s",  # Railway's service would keep the 30s default
    }
    tenants = example_gitops_tenants()
    # Railway's second service, the proxy's PgBouncer agent: without one no tenant is PgBouncerReady.
    agent, _ = pgbouncer_agent(stack, containers, env["DYNABASE_REDIS_URL"])

    def serve(port: int) -> Container:
        # Railway's start command replaces the image's ENTRYPOINT, in exec form.
        container = containers(entrypoint=command, env={**env, "PORT": str(port)},
                               volumes=(f"{repo}:/srv/gitops:ro",))
        container.wait_until("/readyz 200", lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200)
        status: dict[str, Any] = {}

        def all_ready() -> bool:
            status.update(http_json(f"http://127.0.0.1:{port}/status"))
            return {key: t["ready"] for key, t in status["tenants"].items()} == dict.fromkeys(tenants, True)

        container.wait_until("the example tenants Ready", all_ready)
        assert status["active"] and not status["invalidManifests"], status
        return container

    first = serve(free_port())
    before = role_passwords(stack, list(tenants.values()))
    assert sorted(before) == sorted(tenants.values()) and all(p.startswith("SCRAM-SHA-256$") for p in before.values())
    assert_stops_cleanly(first)

    second = serve(free_port())  # a redeploy: new container, empty volume, the same variables
    assert role_passwords(stack, list(tenants.values())) == before
    logs = second.logs()
    assert env["DYNABASE_SECRETS_KEY"] not in logs and "SCRAM-SHA-256$" not in logs
    assert_stops_cleanly(second)
    assert_stops_cleanly(agent)


async def test_proxy_and_its_pgbouncer_agent_serve_a_tenant(
        image: str, stack: Stack, containers: Callable[..., Container], redis_db: Callable[[int], str]) -> None:
    stack.need("postgres", "redis")
    layout = redis_db(2)
    agent, agent_id = pgbouncer_agent(stack, containers, layout)
    proxy_port = free_port()
    proxy = containers(command=["dynabase", "proxy"], env={
        "DYNABASE_REDIS_URL": layout,
        "DYNABASE_PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "DYNABASE_PROXY_METRICS_PORT": str(free_port()),
        "DYNABASE_AGENT_ID": agent_id,
    })
    proxy.wait_until("the proxy listening", lambda: port_open(proxy_port))

    engine, passwords, _ = await make_engine(stack.env["DYNABASE_POSTGRES_DSN"])
    engine.pgbouncer, engine.proxy = PgBouncerBackend(layout), ProxyBackend(layout)
    db = unique("img")
    try:
        policy = example_policy()
        member = make_tenant(db, "PRO")
        deadline = time.monotonic() + 90
        while True:  # the agent confirms the layout it was sent; each pass looks again
            result = await engine.reconcile_all({policy.metadata.name: policy}, [member])
            if result.tenants[0].ready:
                break
            assert agent.running(), agent.logs()
            assert time.monotonic() < deadline, [o for o in result.tenants[0].outcomes if not o.ok]
            await asyncio.sleep(0.5)
        password = passwords.passwords[member.key]
        while True:  # until the proxy's next topology refresh has seen the agent's new pool
            try:
                conn = await asyncpg.connect(host="127.0.0.1", port=proxy_port, user=db, password=password,
                                             database=db, ssl=False, statement_cache_size=0)
                break
            except asyncpg.CannotConnectNowError:
                assert time.monotonic() < deadline, proxy.logs()
                await asyncio.sleep(0.2)
        try:
            assert await conn.fetchval("SELECT current_user") == db
        finally:
            await conn.close()
    finally:
        await close_engine(engine)
    assert_stops_cleanly(proxy)
    assert_stops_cleanly(agent)


def admin_kubeconfig_with_data(stack: Stack, into: Path) -> Path:
    """The devstack's admin kubeconfig with the files inlined, readable by the image's user."""
    config = yaml.safe_load(Path(stack.env["KUBECONFIG"]).read_text())

    def inline(entry: dict[str, Any], key: str) -> None:
        if key in entry:
            entry[f"{key}-data"] = base64.b64encode(Path(entry.pop(key)).read_bytes()).decode()

    for cluster in config["clusters"]:
        inline(cluster["cluster"], "certificate-authority")
    for user in config["users"]:
        inline(user["user"], "client-certificate")
        inline(user["user"], "client-key")
    into.mkdir()
    (into / "config").write_text(yaml.safe_dump(config))
    (into / "config").chmod(0o600)
    owned_by_image_user(into)
    return into


@pytest.mark.kube
def test_operator_against_the_apiserver(image: str, stack: Stack, crds_applied: None,
                                        containers: Callable[..., Container], redis_db: Callable[[int], str],
                                        tmp_path: Path) -> None:
    stack.need("postgres", "redis", "kube-apiserver")
    namespace = f"img-{uuid.uuid4().hex[:6]}"
    stack.kubectl("create", "namespace", namespace)
    stack.kubectl("apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
    kube = admin_kubeconfig_with_data(stack, tmp_path / "kube")
    layout = redis_db(3)
    agent, _ = pgbouncer_agent(stack, containers, layout)
    liveness = free_port()
    operator = containers(command=["dynabase", "operator"], volumes=(f"{kube}:/etc/dynabase-kube:ro",), env={
        "KUBECONFIG": "/etc/dynabase-kube/config",
        "DYNABASE_NAMESPACES": namespace,
        "DYNABASE_POSTGRES_DSN": stack.env["DYNABASE_POSTGRES_DSN"],
        "DYNABASE_REDIS_URL": layout,
        "DYNABASE_LIVENESS_PORT": str(liveness),
        "DYNABASE_METRICS_PORT": str(free_port()),
    })
    db = unique("imgop")
    stack.kubectl("apply", "-f", "-", input=tenant("shop", f"orgId: org-shop\ntier: PRO\ndatabaseName: {db}\n",
                                                   namespace))

    def ready() -> bool:
        out = stack.kubectl("get", "tdb", "shop", "-n", namespace, "-o",
                            'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)
        return out.stdout.strip() == "True"

    operator.wait_until("the tenant Ready", ready)
    assert http_status(f"http://127.0.0.1:{liveness}/healthz") == 200
    with psycopg.connect(stack.env["DYNABASE_POSTGRES_DSN"]) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is not None
    assert_stops_cleanly(operator)
    assert_stops_cleanly(agent)


def test_webhooks_receiver_commits_a_signed_stripe_event(image: str, containers: Callable[..., Container],
                                                         tmp_path: Path) -> None:
    remote = gitops_repository(tmp_path, bare=True)
    config = tmp_path / "billing"
    config.mkdir()
    (config / "tiers.yaml").write_text("prices:\n  price_pro_monthly: PRO\n")
    owned_by_image_user(config)
    port = free_port()
    receiver = containers(command=["dynabase", "webhooks"], env={
        "DYNABASE_WEBHOOKS_CONFIG": "/etc/dynabase-billing/tiers.yaml",
        "DYNABASE_WEBHOOKS_LISTEN": f"127.0.0.1:{port}",
        "DYNABASE_WEBHOOKS_MODE": "git",
        "DYNABASE_GITOPS_URL": "file:///srv/gitops.git",
        "DYNABASE_GITOPS_PATH": "tenants",
        "DYNABASE_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }, volumes=(f"{remote}:/srv/gitops.git", f"{config}:/etc/dynabase-billing:ro"))
    receiver.wait_until("/healthz 200", lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200)

    event = subscription_event("org-acme", "price_pro_monthly", kind="created")
    payload = json.dumps(event)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{WEBHOOK_PATH}", data=payload.encode(), method="POST",
        headers={"Stripe-Signature": stripe_signature(payload), "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["outcome"] == "applied"
    subject = git("log", "-1", "--format=%s", "main", cwd=remote)
    assert "org-acme tier -> PRO" in subject and event["id"] in subject
    forged = urllib.request.Request(
        f"http://127.0.0.1:{port}{WEBHOOK_PATH}", data=payload.encode(), method="POST",
        headers={"Stripe-Signature": stripe_signature(payload, "whsec_other"), "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 400
    assert WEBHOOK_SECRET not in receiver.logs()
    assert_stops_cleanly(receiver)
