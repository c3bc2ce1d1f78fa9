"""stripe-mock on a free loopback port, and a counting proxy in front of it that records every
request as Stripe would receive it (and can kill the client mid-run, or refuse a tenant)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dynabase.devstack import binaries
from dynabase.devstack.stack import free_port

from .conftest import missing_server


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # without the query
    query: dict[str, str]
    idempotency_key: str | None
    form: dict[str, str]  # the form-encoded body: "metadata[tenant]" -> "ns/a"
    status: int

    @property
    def tenant(self) -> str | None:
        return self.form.get("metadata[tenant]")

    @property
    def creates_item(self) -> bool:
        return self.method == "POST" and self.path == "/v1/invoiceitems"


@dataclass
class Behaviour:
    """What the proxy does besides forwarding; changed by the tests between runs."""

    kill_after_items: int | None = None  # SIGKILL `victim` once this many items were created at stripe-mock
    victim: subprocess.Popen[str] | None = None
    refuse_tenants: set[str] = field(default_factory=set)  # answered like Stripe refusing the request
    list_item_key: str | None = None  # put this close key in the metadata of the first listed item


class StripeRecorder:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[Recorded] = []
        self.behaviour = Behaviour()
        self.item_created = threading.Event()  # set when stripe-mock has created an invoice item
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _handle(self) -> None:
                recorder.handle(self)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def items(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.creates_item]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.behaviour = Behaviour()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(handler.path)
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        tenant = form.get("metadata[tenant]")
        behaviour = self.behaviour
        if tenant is not None and tenant in behaviour.refuse_tenants:
            status, payload = 400, (b'{"error": {"type": "invalid_request_error", "code": "resource_missing", '
                                    b'"message": "No such customer"}}')
        else:
            status, payload = self._forward(handler, body)
            if handler.command == "GET" and behaviour.list_item_key and url.path == "/v1/invoiceitems":
                payload = _with_listed_key(payload, behaviour.list_item_key)
        record = Recorded(handler.command, url.path, dict(urllib.parse.parse_qsl(url.query)),
                          handler.headers.get("Idempotency-Key"), form, status)
        with self._lock:
            self.requests.append(record)
            created = sum(r.creates_item and r.status == 200 for r in self.requests)
        if created:
            self.item_created.set()
        if (record.creates_item and behaviour.kill_after_items is not None and behaviour.victim is not None
                and created == behaviour.kill_after_items):
            # stripe-mock has created the item; the client dies before it hears so.
            behaviour.victim.send_signal(signal.SIGKILL)
            behaviour.victim.wait()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the client was killed

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(handler.command, handler.path, body=body or None, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, payload

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _with_listed_key(payload: bytes, key: str) -> bytes:
    import json

    listed = json.loads(payload)
    if listed.get("data"):
        listed["data"][0]["metadata"] = {"dynabase_close": key}
    return json.dumps(listed).encode()


def start_stripe_mock() -> Iterator[int]:
    """stripe-mock on free loopback ports; yields its HTTP port once it listens."""
    try:
        binary = binaries.ensure(binaries.STRIPE_MOCK, build=os.environ.get("DYNABASE_BUILD_BINARIES", "0") == "1")
    except binaries.BinaryUnavailable as exc:
        missing_server(f"stripe-mock unavailable here: {exc}")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-http-addr", f"127.0.0.1:{port}", "-https-addr",
                             f"127.0.0.1:{free_port()}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # it prints where it listens once the listener is open
            if line.startswith("Listening for HTTP at"):
                break
        else:
            raise RuntimeError(f"stripe-mock exited ({proc.wait()}) before listening")
        drain = threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True)
        drain.start()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
