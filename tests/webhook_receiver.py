"""A webhook receiver on loopback, as a platform's app would run one: it checks every signature,
answers 500 to the first attempts of each event (to make the sender retry), and processes each event
id once however often it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dynabase.devstack.stack import free_port
from dynabase.events import webhook

WAIT_SECONDS = 30.0  # a safety net for a sender that never comes, not a measure of speed


@dataclass
class Request:
    event_id: str
    attempt: int
    body: bytes
    signature_ok: bool
    answered: int


@dataclass
class Receiver:
    secret: str
    fail_first: int = 2  # attempts of each event answered 500
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> payload, once each
    duplicates: int = 0  # deliveries of an event already processed (dropped, answered 200)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        event_id = request.headers.get(webhook.EVENT_ID_HEADER, "")
        try:
            webhook.verify(request.headers.get(webhook.SIGNATURE_HEADER, ""), raw, self.secret, now=time.time())
            signed = True
        except webhook.SignatureError:
            signed = False
        seen = sum(1 for r in self.requests if r.event_id == event_id)
        status = 400 if not signed else 500 if seen < self.fail_first else 200
        self.requests.append(Request(event_id, int(request.headers.get(webhook.ATTEMPT_HEADER, "0")), raw, signed,
                                     status))
        if status == 200:
            payload = json.loads(raw)
            if payload["id"] in self.processed:
                self.duplicates += 1
            else:
                self.processed[payload["id"]] = payload
        async with self._changed:
            self._changed.notify_all()
        return web.Response(status=status, text="ok" if status == 200 else "try again")

    async def until(self, check: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT_SECONDS), self._changed:
                await self._changed.wait_for(check)
        except TimeoutError:
            raise AssertionError(f"the receiver never saw {what}; processed: "
                                 f"{sorted(p['type'] for p in self.processed.values())}") from None

    def types(self) -> list[str]:
        return sorted(p["type"] for p in self.processed.values())

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.processed.values() if p["type"] == kind]


@contextlib.asynccontextmanager
async def receiving(secret: str, *, fail_first: int = 2) -> AsyncIterator[Receiver]:
    receiver = Receiver(secret, fail_first)
    app = web.Application()
    app.add_routes([web.post("/hooks/dynabase", receiver.handle)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}/hooks/dynabase"
    try:
        yield receiver
    finally:
        await runner.cleanup()
