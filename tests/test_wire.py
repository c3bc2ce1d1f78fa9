"""The proxy's start-up parser and synthesised messages, fuzzed."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given
from hypothesis import strategies as st

from dynabase.proxy import wire


@given(st.binary(max_size=300))
def test_startup_parser_only_ever_says_more_please_or_protocol_error(data: bytes) -> None:
    # Any other exception (IndexError, UnicodeDecodeError, struct.error …) fails the test.
    with contextlib.suppress(wire.ProtocolError):
        wire.parse_startup(data)


@given(st.dictionaries(st.text(alphabet="abcdefghij_", min_size=1, max_size=10),
                       st.text(max_size=20).filter(lambda v: "\x00" not in v), min_size=1, max_size=5))
def test_startup_parameters_round_trip(params: dict[str, str]) -> None:
    params = {"user": "u", **params}
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    packet = struct.pack("!ii", 8 + len(body), wire.PROTOCOL_3) + body
    parsed = wire.parse_startup(packet)
    assert parsed is not None and parsed.params == params
    assert wire.parse_startup(packet[:-1]) is None  # incomplete: wait for more


def test_error_response_is_well_formed() -> None:
    message = wire.error_response("FATAL", "53300", "too many", hint="upgrade")
    assert message[0:1] == b"E"
    assert int.from_bytes(message[1:5], "big") == len(message) - 1
    assert b"C53300\x00" in message and b"Hupgrade\x00" in message and message.endswith(b"\x00\x00")
