"""Headless mode's HTTP side: /healthz, /readyz, /metrics, /status (JSON)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .reconciler import HeadlessReconciler


def app(reconciler: HeadlessReconciler) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        # Ready once a pass has completed, or as a standby replica (the lock is elsewhere).
        ready = reconciler.state.passes > 0 or not reconciler.state.active
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "no pass yet\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.json_response(reconciler.status())

    application = web.Application()
    application.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz),
        web.get("/metrics", metrics), web.get("/status", status),
    ])
    return application


async def serve(reconciler: HeadlessReconciler, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app(reconciler), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
