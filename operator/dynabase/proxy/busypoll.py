"""Opt-in busy polling: after traffic, keep the event loop spinning (polling its sockets
without sleeping) for a short window, so the next message is picked up at once.

Why: on virtual machines an idle vCPU halts, and waking it for the next packet costs
tens to hundreds of microseconds (on the development VM about 100 us per wake-up), which
a proxy pays twice per round trip. Spinning keeps the proxy's vCPU awake while traffic
is flowing, at the price of CPU time: up to one core while a tenant sends a query at
least every window. When traffic stops it stops after one window, so an idle proxy
costs nothing. The same trade as the kernel's SO_BUSY_POLL, in user space.
"""

from __future__ import annotations

import asyncio
import time


class BusyPoll:
    __slots__ = ("loop", "spinning", "stopped", "until", "window")

    def __init__(self, window_us: int) -> None:
        self.window = window_us / 1_000_000
        self.until = 0.0
        self.spinning = False
        self.stopped = asyncio.Event()  # set while not spinning (for whoever waits for the quiet)
        self.stopped.set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def poke(self) -> None:
        """Traffic now: spin until a window after it."""
        self.until = time.monotonic() + self.window
        if not self.spinning:
            self.spinning = True
            self.stopped.clear()
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        # A ready callback makes the loop poll with a zero timeout instead of sleeping.
        if time.monotonic() < self.until:
            assert self.loop is not None
            self.loop.call_soon(self._spin)
        else:
            self.spinning = False
            self.stopped.set()
