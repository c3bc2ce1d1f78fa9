"""Log-in with the tenant's own database credentials, checked against Postgres.

The password is checked against the role's SCRAM-SHA-256 verifier in ``pg_authid``
in this process (``desired.scram.verifier_matches``), not by opening a connection:
a connection would take one of the tenant's own connection slots (a FREE tenant at
its limit could not log in), and would need a route to Postgres that the network
policy keeps for the platform. Changing the database password changes the verifier
and so ends every portal session of the tenant (``backends.portal_pg``).

Guessing is slowed per database name: after ``max_failures`` failed log-ins within
``window`` the name is refused for the rest of the window (in this process; behind
a load balancer the remote address is the balancer's, so it cannot be the key).
An unknown name costs the same verifier computation as a wrong password, and both
get the same answer.
"""

from __future__ import annotations

import collections
import datetime as dt
import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dynabase.backends.portal_pg import PortalStore
from dynabase.desired.scram import scram_verifier, verifier_matches
from dynabase.spec import TenantDatabase

# A verifier no password matches: an unknown database costs as much as a known one.
_DECOY = scram_verifier("decoy: no tenant has this database")
MAX_DATABASE, MAX_PASSWORD = 63, 1024


@dataclass
class LoginThrottle:
    max_failures: int = 10
    window: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, collections.deque[float]] = field(default_factory=dict)

    def retry_after(self, database: str) -> float:
        """Seconds until ``database`` may try again; 0 when it may now."""
        recent = self._recent(database)
        if len(recent) < self.max_failures:
            return 0.0
        return max(0.0, recent[0] + self.window - self.clock())

    def failed(self, database: str) -> None:
        self._recent(database).append(self.clock())

    def succeeded(self, database: str) -> None:
        self._failures.pop(database, None)

    def _recent(self, database: str) -> collections.deque[float]:
        if len(self._failures) > 100_000:  # a flood of made-up names must not grow memory without end
            self._failures.clear()
        recent = self._failures.setdefault(database, collections.deque())
        while recent and recent[0] + self.window <= self.clock():
            recent.popleft()
        return recent


@dataclass(frozen=True)
class LoggedIn:
    tenant: TenantDatabase
    token: str  # the session cookie's value


async def log_in(store: PortalStore, tenants: Sequence[TenantDatabase], database: str, password: str,
                 lifetime: dt.timedelta, now: dt.datetime) -> LoggedIn | None:
    """The tenant whose database and password these are, with a new session; None otherwise."""
    if not database or len(database) > MAX_DATABASE or len(password) > MAX_PASSWORD:
        return None
    tenant = next((t for t in tenants if t.database_name == database), None)
    login = await store.role_login(database) if tenant is not None else None
    verifier = login.verifier if login is not None else None
    matches = verifier_matches(verifier or _DECOY, password)
    if tenant is None or login is None or verifier is None or not matches:
        return None
    if login.valid_until is not None and login.valid_until <= now:
        return None  # the password has expired for Postgres too
    token, _ = await store.open(tenant.key, database, verifier, lifetime)
    return LoggedIn(tenant, token)


def same_token(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(str(given), str(expected))
