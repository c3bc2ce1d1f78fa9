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
