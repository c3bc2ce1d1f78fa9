"""HTTP side: POST /stripe/webhook, GET /healthz, GET /metrics."""

from __future__ import annotations

import json
import logging

import stripe
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import WebhookSecret
from .processor import EVENTS, WebhookProcessor

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/stripe/webhook"
TOLERANCE_SECONDS = 300  # Stripe's default: an older signature is a replay, not a retry (retries are re-signed)
MAX_BODY_BYTES = 512 * 1024  # Stripe events are a few KiB


def webhook_app(processor: WebhookProcessor, secret: WebhookSecret,
                tolerance: int = TOLERANCE_SECONDS) -> web.Application:
    async def stripe_webhook(request: web.Request) -> web.Response:
        payload = await request.read()
        try:
            stripe.Webhook.construct_event(payload, request.headers.get("Stripe-Signature"), secret.reveal(),
                                           tolerance=tolerance)
        except stripe.SignatureVerificationError as exc:
            # The library's message names the problem (mismatch, missing header, timestamp), never the secret.
            stale = "tolerance" in str(exc)
            EVENTS.labels("stale" if stale else "bad_signature").inc()
            log.warning("webhook refused", extra={"reason": str(exc).split(".")[0][:120],
                                                  "remote": request.remote or ""})
            return web.json_response({"error": "stale timestamp" if stale else "invalid signature"}, status=400)
        except ValueError:
            EVENTS.labels("bad_payload").inc()
            return web.json_response({"error": "invalid JSON payload"}, status=400)
        event = json.loads(payload)
        if not isinstance(event, dict):
            EVENTS.labels("bad_payload").inc()
            return web.json_response({"error": "the payload is not an event object"}, status=400)
        handled = await processor.handle(event)
        return web.json_response({"outcome": handled.outcome, "detail": handled.detail}, status=handled.status)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.add_routes([web.post(WEBHOOK_PATH, stripe_webhook), web.get("/healthz", healthz),
                    web.get("/metrics", metrics)])
    return app
