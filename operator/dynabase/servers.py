"""The long-running commands (operator, headless, proxy, pgbouncer-agent, webhooks, portal): their
options and how each starts.

Every option a deployment sets reads a variable when its flag is absent (options.py), so the image runs
from an exec-form command line with no shell to expand ``${VAR}``; ``--help`` names each variable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .kube.shards import UNSHARDED, Shard
from .options import EXIT_INVALID, EXIT_OK, Command, parse_choice, parse_listen
from .settings import (
    SettingsError,
    cache_dir,
    from_env,
    parse_bool,
    parse_duration,
    parse_int,
    parse_list,
    parse_port,
    secret_from_env,
    state_dir,
)


def add_server_commands(sub: Any) -> None:
    _operator_parser(sub)
    _headless_parser(sub)
    _proxy_parser(sub)
    _agent_parser(sub)
    _webhooks_parser(sub)
    _portal_parser(sub)


def _cmd_pgbouncer_agent(args: argparse.Namespace) -> int:
    import asyncio

    from dynabase.agent.pgbouncer import PgBouncerAgent, run_agent

    password = secret_from_env("DYNABASE_PGBOUNCER_ADMIN_PASSWORD")
    if not password:
        print("dynabase pgbouncer-agent: set DYNABASE_PGBOUNCER_ADMIN_PASSWORD (or …_FILE), the password "
              "the agent gives PgBouncer's admin console", file=sys.stderr)
        return EXIT_INVALID
    agent = PgBouncerAgent(
        redis_url=args.redis_url, workdir=Path(args.workdir), postgres_host=args.postgres_host,
        postgres_port=args.postgres_port, admin_password=password, base_port=args.base_port,
        listen_host=args.listen_host,
    )
    asyncio.run(run_agent(agent))
    return EXIT_OK


def _cmd_operator(args: argparse.Namespace) -> int:
    # kopf imports these client libraries whenever they are installed, only to recognise
    # their model objects, which the operator never hands it. Marking them absent makes kopf skip them.
    for library in ("kubernetes", "kubernetes_asyncio", "pykube"):
        sys.modules.setdefault(library, None)  # type: ignore[arg-type]
    from dynabase.kube.handlers import run
    from dynabase.kube.settings import OperatorSettings

    run(OperatorSettings(
        namespaces=args.namespace, drift_interval=args.drift_interval, concurrency=args.concurrency,
        peering=args.peering, peering_lifetime=args.peering_lifetime, shard=args.shard,
        metrics_port=args.metrics_port, liveness_port=args.liveness_port,
        max_workers=args.max_workers, api_connections=args.api_connections,
    ))
    return EXIT_OK


def _cmd_proxy(args: argparse.Namespace) -> int:
    from dynabase.proxy.main import ProxySettings, default_replica_id, run

    host, port = args.listen
    run(ProxySettings(
        listen_host=host, listen_port=port, pgbouncer_host=args.pgbouncer_host,
        redis_url=args.redis_url, agent_id=args.agent_id, replica_id=args.replica_id or default_replica_id(port),
        metrics_port=args.metrics_port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        pgbouncer_advertise_host=args.pgbouncer_advertise_host, busy_poll_us=args.busy_poll_us,
        kernel_splice=args.kernel_splice,
    ))
    return EXIT_OK


def _cmd_headless(args: argparse.Namespace) -> int:
    import asyncio
    import datetime as dt

    from dynabase.billing.config import ConfigError, load_api_key
    from dynabase.engine.runtime import EngineSettings, close_engine, start_engine
    from dynabase.events.delivery import declared_endpoints
    from dynabase.events.pipeline import event_pipeline
    from dynabase.headless.http import serve
    from dynabase.headless.reconciler import HeadlessReconciler
    from dynabase.headless.source import DirectorySource, GitSource
    from dynabase.portal.sources import headless_portal
    from dynabase.stopping import stop_on_signals

    try:
        settings = EngineSettings.from_env(postgres_dsn=args.postgres_dsn, secrets_dir=args.secrets_dir,
                                           secrets_store=args.secrets_store, headless=True)
        stripe_key = load_api_key(os.environ)
    except (SettingsError, ConfigError) as exc:
        print(f"dynabase headless: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if "://" in args.source or args.source.startswith("git@"):
        source: DirectorySource | GitSource = GitSource(args.source, args.ref, cache_dir() / "git", args.subdir)
    else:
        source = DirectorySource(Path(args.source))

    async def run() -> None:
        engine = await start_engine(settings)
        reconciler = HeadlessReconciler(engine, source, interval=args.interval,
                                        confirm_deletion=dt.timedelta(seconds=args.confirm_deletion),
                                        lock_dsn=settings.postgres_dsn,
                                        month_end=_month_end_close(engine, settings.postgres_dsn, stripe_key))
        reconciler.events, reconciler.notifier = event_pipeline(engine.postgres.pool,
                                                                declared_endpoints(reconciler.tenant))
        runner = await serve(reconciler, args.host, args.port, headless_portal(reconciler) if args.portal else None)
        stop = stop_on_signals()
        try:
            await reconciler.run(stop)
        finally:
            await runner.cleanup()
            await close_engine(engine)

    asyncio.run(run())
    return EXIT_OK


def _month_end_close(engine: Any, postgres_dsn: str, stripe_key: Any) -> Any:
    """The previous month's billing close in headless mode: with a Stripe API key and metered usage."""
    from dynabase.billing.close import StripeSettings, run_close
    from dynabase.headless.month_end import MonthEndClose
    from dynabase.usage.month import month_reader_of

    reader = month_reader_of(engine)
    if stripe_key is None or reader is None:
        return None
    stripe = StripeSettings(stripe_key, from_env("DYNABASE_STRIPE_API_BASE", str, None))

    async def close(month: str, policies: Any, tenants: Any) -> bool:
        result = await run_close(month, lambda: reader.price(month, policies, tenants), postgres_dsn, stripe)
        return result.closed

    return MonthEndClose(close)


def _cmd_webhooks(args: argparse.Namespace) -> int:
    from dynabase.billing.config import ConfigError
    from dynabase.billing.main import WebhookSettings, run

    try:
        settings = WebhookSettings.from_args(
            config_path=args.config, listen=args.listen, mode=args.mode, namespaces=args.namespace, repo=args.repo,
            ref=args.ref, path=args.path, postgres_dsn=args.postgres_dsn, ledger_file=args.ledger_file,
        )
    except ConfigError as exc:
        print(f"dynabase webhooks: {exc}", file=sys.stderr)
        return EXIT_INVALID
    run(settings)
    return EXIT_OK


def engine_options(cmd: argparse.ArgumentParser) -> None:
    """Read by EngineSettings.from_env (the operator builds one too, without flags)."""
    cmd.add_argument("--postgres-dsn", help="superuser DSN [$DYNABASE_POSTGRES_DSN; required]")
    cmd.add_argument("--secrets-store", choices=["postgres", "files"],
                     help="where generated tenant passwords are kept: postgres (encrypted with "
                          "$DYNABASE_SECRETS_KEY, shared by every replica) or files [$DYNABASE_SECRETS_STORE; "
                          "default postgres when a key is set, else files]")
    cmd.add_argument("--secrets-dir", help="the files store's folder [$DYNABASE_SECRETS_DIR; default "
                                           "$XDG_DATA_HOME/dynabase/secrets]")


def _operator_parser(sub: Any) -> None:
    op = Command(sub.add_parser("operator", help="run the Kubernetes operator (kopf)"))
    op.option("--namespace", env="DYNABASE_NAMESPACES", parse=parse_list, action="append", default=[],
              default_text="all", example="team-a,team-b",
              help="watch only these namespaces (repeat; the variable is comma separated)")
    op.option("--drift-interval", env="DYNABASE_DRIFT_INTERVAL", parse=parse_duration, default=60.0,
              default_text="60s", help="time between drift passes per tenant (seconds, or 30s, 5m)")
    op.option("--concurrency", env="DYNABASE_CONCURRENCY", parse=_positive_int, default=8,
              help="backend connections and parallel tenants")
    op.option("--peering", env="DYNABASE_PEERING", help="peering name: one active replica among several, "
                                                        "the oldest; NAME-shard-N per shard (unset: standalone)")
    op.option("--peering-lifetime", env="DYNABASE_PEERING_LIFETIME", parse=_seconds, default=60, default_text="60s",
              help="how long a crashed active replica is waited for before a standby takes over")
    op.option("--shard", env="DYNABASE_SHARD", parse=Shard.parse, default=UNSHARDED, default_text="0/1, all tenants",
              example="0/2", help="N/M: reconcile only tenants labelled dynabase.io/shard=N, and label those "
                                  "without a shard whose name hashes to N; every operator uses the same M")
    op.option("--metrics-port", env="DYNABASE_METRICS_PORT", parse=parse_port, default=9090,
              help="Prometheus /metrics port (0 = off)")
    op.option("--liveness-port", env="DYNABASE_LIVENESS_PORT", parse=parse_port, default=8080,
              help="/healthz port (0 = off)")
    op.option("--max-workers", env="DYNABASE_MAX_WORKERS", parse=_whole_number, default=1000,
              help="objects handled in parallel (0 = unbounded)")
    op.option("--api-connections", env="DYNABASE_API_CONNECTIONS", parse=_positive_int, default=16,
              help="apiserver connections besides the watches")
    op.done(_cmd_operator)


def _headless_parser(sub: Any) -> None:
    hl = Command(sub.add_parser("headless", help="reconcile manifests from a folder or git repository, "
                                                 "without Kubernetes"))
    hl.option("--source", env="DYNABASE_GITOPS_URL", required=True, help="a folder, or a git URL")
    hl.option("--ref", env="DYNABASE_GITOPS_REF", default="main", help="git branch or tag")
    hl.option("--subdir", env="DYNABASE_GITOPS_PATH", default="", default_text="the root",
              help="folder of the manifests in the repository")
    hl.option("--interval", env="DYNABASE_INTERVAL", parse=parse_duration, default=30.0, default_text="30s",
              help="time between passes (seconds, or 30s, 5m)")
    hl.option("--confirm-deletion", env="DYNABASE_CONFIRM_DELETION", parse=parse_duration, default=600.0,
              default_text="10m", help="how long a tenant must be absent before its deletionPolicy applies")
    hl.option("--host", env="DYNABASE_LISTEN_HOST", default="0.0.0.0", help="address of the HTTP endpoints")
    hl.option("--port", env="PORT", parse=parse_port, default=8080,
              help="/healthz /readyz /metrics /status, and the tenant portal under /portal/")
    hl.option("--portal", env="DYNABASE_PORTAL", parse=parse_bool, default=True,
              help="serve the tenant portal's pages under /portal/ (true/false)")
    engine_options(hl.parser)
    hl.done(_cmd_headless)


def _proxy_parser(sub: Any) -> None:
    px = Command(sub.add_parser("proxy", help="the tenant proxy in front of PgBouncer"))
    px.option("--listen", env="DYNABASE_PROXY_LISTEN", parse=parse_listen, default=("0.0.0.0", 5432),
              default_text="0.0.0.0:5432", example="0.0.0.0:5432", help="HOST:PORT clients connect to")
    px.option("--pgbouncer-host", env="DYNABASE_PGBOUNCER_HOST", default="127.0.0.1",
              help="where this replica's PgBouncers listen")
    px.option("--pgbouncer-advertise-host", env="DYNABASE_PGBOUNCER_ADVERTISE_HOST", default_text="--pgbouncer-host",
              help="address other proxy replicas use to forward CancelRequests to this PgBouncer")
    px.option("--redis-url", env="DYNABASE_REDIS_URL", required=True, help="where the limits are published")
    px.option("--agent-id", env="DYNABASE_AGENT_ID", default_text="any",
              help="the pgbouncer-agent beside this proxy")
    px.option("--replica-id", env="DYNABASE_REPLICA_ID", default_text="HOSTNAME:PORT", help="this replica's name")
    px.option("--metrics-port", env="DYNABASE_PROXY_METRICS_PORT", parse=parse_port, default=9187,
              help="Prometheus /metrics port (0 = off)")
    px.option("--tls-cert", env="DYNABASE_PROXY_TLS_CERT", help="terminate TLS with this certificate "
                                                                "(SSLRequest answered S)")
    px.option("--tls-key", env="DYNABASE_PROXY_TLS_KEY", help="the certificate's key file")
    px.option("--busy-poll-us", env="DYNABASE_PROXY_BUSY_POLL_US", parse=_busy_poll, default=0,
              default_text="0 = off", example="300",
              help="after traffic keep polling this many microseconds instead of sleeping: lower latency "
                   "on VMs, for CPU")
    px.option("--kernel-splice", env="DYNABASE_PROXY_KERNEL_SPLICE", parse=parse_choice("auto", "on", "off"),
              default="auto", example="off",
              help="forward connections of tenants without a QPS limit in the kernel (eBPF sockmap) once "
                   "authenticated: auto = where this machine allows it, on = required, off = all in Python")
    px.done(_cmd_proxy)


def _agent_parser(sub: Any) -> None:
    agent = Command(sub.add_parser("pgbouncer-agent", help="render the published pool layout into local PgBouncers"))
    agent.option("--workdir", env="DYNABASE_PGBOUNCER_WORKDIR", fallback=lambda: str(state_dir() / "pgbouncer"),
                 default_text="$XDG_STATE_HOME/dynabase/pgbouncer", help="config, pid and socket files")
    agent.option("--redis-url", env="DYNABASE_REDIS_URL", required=True, help="where the layout is published")
    agent.option("--postgres-host", env="DYNABASE_PGBOUNCER_UPSTREAM_HOST", required=True,
                 help="host or unix socket directory of Postgres")
    agent.option("--postgres-port", env="DYNABASE_PGBOUNCER_UPSTREAM_PORT", parse=parse_port, default=5432,
                 help="Postgres port")
    agent.option("--listen-host", env="DYNABASE_PGBOUNCER_LISTEN_HOST", default="127.0.0.1",
                 help="where the PgBouncers listen")
    agent.option("--base-port", env="DYNABASE_PGBOUNCER_BASE_PORT", parse=parse_port, default=6432,
                 help="the _default pool; tier pools above it")
    agent.done(_cmd_pgbouncer_agent)


def _webhooks_parser(sub: Any) -> None:

    wh = Command(sub.add_parser("webhooks", help="Stripe subscription events change tenants' declared tiers"))
    wh.option("--config", env="DYNABASE_WEBHOOKS_CONFIG", required=True, help="price/product -> tier mapping (YAML)")
    wh.option("--listen", env="DYNABASE_WEBHOOKS_LISTEN", parse=parse_listen, example="0.0.0.0:8080",
              fallback=lambda: ("0.0.0.0", from_env("PORT", parse_port, 8080, example="8080")),
              default_text="0.0.0.0:$PORT, else 0.0.0.0:8080", help="HOST:PORT for /stripe/webhook /healthz /metrics")
    wh.option("--mode", env="DYNABASE_WEBHOOKS_MODE", parse=parse_choice("kube", "git"), default="kube",
              example="git", help="patch TenantDatabases (kube) or commit to the GitOps repository (git)")
    wh.option("--namespace", env="DYNABASE_NAMESPACES", parse=parse_list, action="append", default=[],
              default_text="all", example="team-a,team-b", help="kube: only these namespaces (repeat)")
    wh.option("--repo", env="DYNABASE_GITOPS_URL", help="git: repository URL")
    wh.option("--ref", env="DYNABASE_GITOPS_REF", default="main", help="git: branch to commit to")
    wh.option("--path", env="DYNABASE_GITOPS_PATH", default="", help="git: folder of the manifests in the repository")
    wh.option("--postgres-dsn", env="DYNABASE_POSTGRES_DSN", default_text="a file ledger",
              help="remember processed events in dynabase.stripe_events")
    wh.option("--ledger-file", env="DYNABASE_WEBHOOKS_LEDGER_FILE",
              fallback=lambda: str(cache_dir() / "stripe-events.json"),
              default_text="$DYNABASE_CACHE_DIR/stripe-events.json", help="without a DSN: a JSON file")
    wh.done(_cmd_webhooks)


def _cmd_portal(args: argparse.Namespace) -> int:
    import asyncio

    import asyncpg
    from aiohttp import web

    from dynabase.backends.proxy import ProxyBackend
    from dynabase.portal.app import standalone_app
    from dynabase.portal.sources import KubeDeclarations, ManifestDeclarations, standalone_portal
    from dynabase.stopping import stop_on_signals
    from dynabase.usage.month import RedisRollups

    if bool(args.manifests) == args.kube:
        print("dynabase portal: give the tenants with --manifests PATH… or --kube (read from the cluster)",
              file=sys.stderr)
        return EXIT_INVALID

    async def run() -> None:
        pool = await asyncpg.create_pool(args.postgres_dsn, min_size=1, max_size=4)
        proxy = ProxyBackend(args.redis_url) if args.redis_url else None
        try:
            declarations = ManifestDeclarations(args.manifests, pool) if args.manifests else \
                KubeDeclarations(args.namespace)
            portal = standalone_portal(declarations, pool, RedisRollups(proxy) if proxy else None)
            portal.secure_cookies = args.secure_cookies
            runner = web.AppRunner(standalone_app(portal), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, *args.listen).start()
            try:
                await stop_on_signals().wait()
            finally:
                await runner.cleanup()
        finally:
            if proxy is not None:
                await proxy.close()
            await pool.close()

    asyncio.run(run())
    return EXIT_OK


def _portal_parser(sub: Any) -> None:
    pt = Command(sub.add_parser("portal", help="the tenant portal alone: one page per tenant behind a log-in with "
                                               "its database credentials"))
    pt.parser.add_argument("--manifests", nargs="+", help="TierPolicy/TenantDatabase files or folders "
                                                          "(status from Postgres, as headless mode keeps it)")
    pt.parser.add_argument("--kube", action="store_true", help="TierPolicies and TenantDatabases (with status) "
                                                               "from the cluster")
    pt.option("--namespace", env="DYNABASE_NAMESPACES", parse=parse_list, action="append", default=[],
              default_text="all", example="team-a,team-b", help="--kube: only these namespaces (repeat)")
    pt.option("--listen", env="DYNABASE_PORTAL_LISTEN", parse=parse_listen, example="0.0.0.0:8080",
              fallback=lambda: ("0.0.0.0", from_env("PORT", parse_port, 8080, example="8080")),
              default_text="0.0.0.0:$PORT, else 0.0.0.0:8080", help="HOST:PORT of /portal/ and /healthz")
    pt.option("--postgres-dsn", env="DYNABASE_POSTGRES_DSN", required=True,
              help="tenant roles' verifiers, sessions, status, events and the cost model")
    pt.option("--redis-url", env="DYNABASE_REDIS_URL", default_text="no usage shown",
              help="the proxies' metered usage")
    pt.option("--secure-cookies", env="DYNABASE_PORTAL_SECURE_COOKIES", parse=parse_choice("auto", "always"),
              default="auto", example="always",
              help="auto: Secure when the request came over https (or X-Forwarded-Proto says so); always")
    pt.done(_cmd_portal)


def _seconds(text: str) -> int:
    return max(1, round(parse_duration(text)))


def _positive_int(text: str) -> int:
    return parse_int(text, minimum=1)


def _whole_number(text: str) -> int:
    return parse_int(text, minimum=0)


def _busy_poll(text: str) -> int:
    return parse_int(text, minimum=0, maximum=10_000)
