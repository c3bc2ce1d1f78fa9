"""SCRAM-SHA-256 verifiers in Postgres' stored format.

The engine hands Postgres a verifier instead of a password, so the plaintext
never travels in SQL or reaches the server's logs, and PgBouncer can hold the
same verifier (SCRAM pass-through needs both sides to store identical ones).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections import OrderedDict

ITERATIONS = 4096
SALT_BYTES = 16
_VERIFIER = re.compile(r"^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$")


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def verifier_matches(verifier: str | None, password: str) -> bool:
    """True when ``verifier`` was made from ``password`` (any salt, any iteration count)."""
    if not verifier:
        return False
    match = _VERIFIER.match(verifier)
    if not match:
        return False
    iterations, salt = int(match.group(1)), base64.b64decode(match.group(2))
    return hmac.compare_digest(scram_verifier(password, salt=salt, iterations=iterations), verifier)


# PBKDF2 with 4096 rounds costs a few ms; a steady-state pass over 10,000 tenants
# must not pay it again for verifiers already checked or made here. Keyed by a
# digest of the pair, so the cache holds no password.
_VERIFIED: OrderedDict[bytes, None] = OrderedDict()
_VERIFIED_MAX = 200_000


def _pair_key(verifier: str, password: str) -> bytes:
    return hashlib.sha256(verifier.encode() + b"\0" + password.encode()).digest()


def _remember(verifier: str, password: str) -> None:
    _VERIFIED[_pair_key(verifier, password)] = None
    while len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)


def password_ok(verifier: str | None, password: str) -> bool:
    """``verifier_matches``, remembered: each pair is checked at most once per process."""
    if not verifier:
        return False
    if _pair_key(verifier, password) in _VERIFIED:
        return True
    ok = verifier_matches(verifier, password)
    if ok:
        _remember(verifier, password)
    return ok


def new_verifier(password: str) -> str:
    """A fresh verifier, remembered as matching ``password``."""
    verifier = scram_verifier(password)
    _remember(verifier, password)
    return verifier
