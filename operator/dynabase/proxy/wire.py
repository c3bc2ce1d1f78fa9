"""Postgres wire protocol pieces the proxy needs: message types and headers, start-up
packets, and the few messages it synthesises or reads (ErrorResponse, ReadyForQuery,
CancelRequest). Pure functions."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Message types the proxy reads. Client: Query, Execute, Sync, FunctionCall. Server:
# ReadyForQuery, ErrorResponse, BackendKeyData ('E' is Execute one way, ErrorResponse the other).
QUERY, EXECUTE, SYNC, FUNCTION_CALL = b"QESF"
READY_FOR_QUERY, ERROR_RESPONSE, BACKEND_KEY_DATA = b"ZEK"
MAX_MESSAGE = 1 << 30  # Postgres' own limit for a single message
header = struct.Struct("!BI").unpack_from  # (type, length) at an offset, without slicing the buffer

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
MAX_STARTUP_LENGTH = 10_000  # Postgres itself refuses start-up packets larger than this


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class Startup:
    kind: str  # "ssl" | "gssenc" | "cancel" | "startup"
    length: int
    params: dict[str, str]
    cancel_pid: int = 0
    cancel_key: int = 0


def parse_startup(buffer: bytes) -> Startup | None:
    """Parse the first packet; None when more bytes are needed."""
    if len(buffer) < 8:
        return None
    length, code = struct.unpack_from("!ii", buffer)
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolError(f"invalid start-up packet length {length}")
    if len(buffer) < length:
        return None
    if code == SSL_REQUEST and length == 8:
        return Startup("ssl", length, {})
    if code == GSSENC_REQUEST and length == 8:
        return Startup("gssenc", length, {})
    if code == CANCEL_REQUEST and length == 16:
        pid, key = struct.unpack_from("!ii", buffer, 8)
        return Startup("cancel", length, {}, pid, key)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    body = buffer[8:length]
    if not body.endswith(b"\x00"):
        raise ProtocolError("start-up parameters are not terminated")
    parts = body[:-1].split(b"\x00")
    if len(parts) % 2 == 1 and parts[-1] == b"":
        parts = parts[:-1]
    if len(parts) % 2:
        raise ProtocolError("start-up parameters are not name/value pairs")
    try:
        params = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}
    except UnicodeDecodeError as exc:
        raise ProtocolError("start-up parameters are not UTF-8") from exc
    if "user" not in params:
        raise ProtocolError("no user in start-up packet")
    return Startup("startup", length, params)


def error_response(severity: str, sqlstate: str, message: str, *, detail: str | None = None,
                   hint: str | None = None) -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(code + value.encode() + b"\x00" for code, value in fields) + b"\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def ready_for_query(status: bytes) -> bytes:
    return b"Z\x00\x00\x00\x05" + status


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


def error_fields(message: bytes) -> dict[str, str]:
    """An ErrorResponse's fields by code ("C": SQLSTATE, "M": message, ...)."""
    out: dict[str, str] = {}
    body = message[5:]
    i = 0
    while i < len(body) and body[i] != 0:
        code = chr(body[i])
        end = body.index(0, i + 1)
        out[code] = body[i + 1 : end].decode(errors="replace")
        i = end + 1
    return out


def backend_key(message: bytes | bytearray, offset: int) -> tuple[int, int]:
    """A BackendKeyData message's (process id, secret key)."""
    pid, key = struct.unpack_from("!ii", message, offset + 5)
    return pid, key
