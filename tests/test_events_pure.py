"""The pure parts of events and notifications: webhook signatures, the retry schedule, `--since`."""

from __future__ import annotations

import argparse
import datetime as dt
import time

import pytest

from dynabase.events import webhook
from dynabase.events.cli import parse_since
from dynabase.events.delivery import NotifySettings


def test_signatures_refuse_a_changed_body_another_secret_and_a_replay() -> None:
    raw, now = b'{"id":"evt_1"}', time.time()
    header = webhook.sign("whsec_a", raw, int(now))
    assert webhook.verify(header, raw, "whsec_a", now=now) == int(now)
    assert webhook.verify(header, raw, ["whsec_new", "whsec_a"], now=now) == int(now)  # while rotating
    for changed, secret, at, why in ((raw + b" ", "whsec_a", now, "no v1 signature matches"),
                                     (raw, "whsec_b", now, "no v1 signature matches"),
                                     (raw, "whsec_a", now + 301, "more than 300 s from now")):
        with pytest.raises(webhook.SignatureError, match=why):
            webhook.verify(header, changed, secret, now=at)
    with pytest.raises(webhook.SignatureError, match="no t="):
        webhook.verify("v1=abc", raw, "whsec_a", now=now)


def test_backoff_doubles_up_to_its_cap_and_ends() -> None:
    settings = NotifySettings(first_retry=30, max_retry=3600, max_attempts=9)
    assert [settings.retry_in(n, 0.0) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, None]
    assert settings.retry_in(8, 1.0) == 3600 * 1.25  # capped, then jittered by up to a quarter


def test_since_takes_a_duration_ago_or_a_moment() -> None:
    now = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
    assert parse_since("90m", now) == dt.datetime(2026, 11, 20, 10, 30, tzinfo=dt.UTC)
    assert parse_since("7d", now) == dt.datetime(2026, 11, 13, 12, 0, tzinfo=dt.UTC)
    assert parse_since("2026-11-01", now) == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert parse_since("2026-11-01T08:00+01:00", now) == dt.datetime(2026, 11, 1, 7, 0, tzinfo=dt.UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration ago"):
        parse_since("last week", now)
