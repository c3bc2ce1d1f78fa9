"""`dynabase webhooks`: settings, wiring and the serve loop."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from dynabase.kubeapi import KubeApi
from dynabase.settings import cache_dir
from dynabase.stopping import stop_on_signals

from .config import BillingConfig, ConfigError, WebhookSecret, load_config, load_webhook_secret
from .ledger import EventLedger, FileLedger, PostgresLedger
from .processor import WebhookProcessor
from .server import webhook_app
from .sinks import GitTierSink, KubeTierSink, TierSink

log = logging.getLogger(__name__)
Mode = Literal["kube", "git"]


@dataclass(frozen=True)
class WebhookSettings:
    config: BillingConfig
    secret: WebhookSecret
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    mode: Mode = "kube"
    namespaces: list[str] = field(default_factory=list)  # kube mode; empty = all
    repo: str = ""  # git mode
    branch: str = "main"
    subdir: str = ""
    ledger_dsn: str | None = None  # remember events in Postgres, else in ledger_file
    ledger_file: Path = Path("stripe-events.json")
    cache_dir: Path = Path(".")

    @classmethod
    def from_args(cls, *, config_path: str, listen: tuple[str, int], mode: Mode, namespaces: list[str],
                  repo: str | None, ref: str, path: str, postgres_dsn: str | None,
                  ledger_file: str) -> WebhookSettings:
        """The command's options, their environment defaults already applied; raises ConfigError."""
        if mode == "git" and not repo:
            raise ConfigError("--mode git needs --repo or DYNABASE_GITOPS_URL (the GitOps repository URL)")
        return cls(
            config=load_config(Path(config_path)), secret=load_webhook_secret(os.environ),
            listen_host=listen[0], listen_port=listen[1], mode=mode, namespaces=namespaces,
            repo=repo or "", branch=ref, subdir=path, ledger_dsn=postgres_dsn or None,
            ledger_file=Path(ledger_file), cache_dir=cache_dir() / "billing-git",
        )


def make_sink(settings: WebhookSettings) -> TierSink:
    if settings.mode == "git":
        return GitTierSink(settings.repo, settings.branch, settings.subdir, settings.cache_dir)
    return KubeTierSink(KubeApi(connections=4), settings.namespaces)


async def open_ledger(settings: WebhookSettings) -> EventLedger:
    if settings.ledger_dsn:
        return await PostgresLedger.open(settings.ledger_dsn)
    return FileLedger(settings.ledger_file)


async def serve(settings: WebhookSettings, stop: asyncio.Event) -> None:
    ledger = await open_ledger(settings)
    sink = make_sink(settings)
    runner = web.AppRunner(webhook_app(WebhookProcessor(settings.config, ledger, sink), settings.secret),
                           access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.listen_host, settings.listen_port).start()
        log.info("webhooks listening", extra={"host": settings.listen_host, "port": settings.listen_port,
                                              "sink": sink.describe(),
                                              "ledger": "postgres" if settings.ledger_dsn else "file"})
        await stop.wait()
    finally:
        await runner.cleanup()
        await sink.close()
        await ledger.close()


def run(settings: WebhookSettings) -> None:
    async def main() -> None:
        await serve(settings, stop_on_signals())

    asyncio.run(main())
