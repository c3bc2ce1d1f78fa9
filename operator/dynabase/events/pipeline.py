"""The event log and the notifications wired together for one process (headless mode, the operator)."""

from __future__ import annotations

import asyncpg

from dynabase.backends.events_pg import PostgresEventLog
from dynabase.backends.notify_pg import NotificationLedger

from .delivery import Deliverer, Endpoints, NotifySettings
from .record import EventRecorder


def event_pipeline(pool: asyncpg.Pool, endpoints: Endpoints,
                   settings: NotifySettings | None = None) -> tuple[EventRecorder, Deliverer]:
    """A recorder for the passes' events and the loop that delivers their notifications; a pass that
    queues notifications wakes the loop at once."""
    deliverer = Deliverer(NotificationLedger(pool), endpoints, settings or NotifySettings.from_env())
    return EventRecorder(PostgresEventLog(pool), on_notify=deliverer.nudge), deliverer
