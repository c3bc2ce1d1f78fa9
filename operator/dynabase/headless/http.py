"""Headless mode's HTTP side: /healthz, /readyz, /metrics, /status (JSON, with each tenant's latest
events), and the tenant portal's pages under /portal when one is given."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .reconciler import HeadlessReconciler

log = logging.getLogger(__name__)
STATUS_EVENTS = 10  # per tenant on /status; `dynabase events` shows the whole history


def app(reconciler: HeadlessReconciler, portal: web.Application | None = None) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        # Ready once a pass has completed, or as a standby replica (the lock is elsewhere).
        ready = reconciler.state.passes > 0 or not reconciler.state.active
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "no pass yet\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        body = reconciler.status()
        if reconciler.events is not None and body["tenants"]:
            try:
                latest = await reconciler.events.log.latest(list(body["tenants"]), STATUS_EVENTS)
            except Exception as exc:  # the status itself is still worth serving
                log.warning("tenant events unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
                body["eventsError"] = f"{type(exc).__name__}: {exc}"
            else:
                for key, tenant in body["tenants"].items():
                    tenant["events"] = [event.as_json() for event in latest.get(key, [])]
        return web.json_response(body)

    application = web.Application()
    application.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz),
        web.get("/metrics", metrics), web.get("/status", status),
    ])
    if portal is not None:
        application.add_subapp("/portal/", portal)
    return application


async def serve(reconciler: HeadlessReconciler, host: str, port: int,
                portal: web.Application | None = None) -> web.AppRunner:
    runner = web.AppRunner(app(reconciler, portal), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
