"""What a proxy replica asks of the others: one protocol, so the proxy's core never checks
whether there is anyone to ask. coordinator.Coordinator answers through Redis; LocalOnly
is the proxy on its own (each limit enforced in full, no shared cancel keys)."""

from __future__ import annotations

from typing import Protocol

BackendKey = tuple[int, int]  # (process id, secret key) as BackendKeyData gives them
Target = tuple[str, int]  # host and port of the PgBouncer that issued a backend key


class Coordination(Protocol):
    # True while the replicas share each tenant's QPS budget (leases); False: each replica
    # enforces its share of it locally. Read on every limited query, so a plain attribute.
    connected: bool

    async def lease(self, owner: str, lanes: int, args: list[float]) -> list[int] | None:
        """Book QPS slots of a budget (its owner: desired.proxy.QpsBudget; the lease script's ARGV:
        limiter.TenantLimiter.lease_args); the reply, or None when the other replicas cannot be
        reached (``connected`` is False then)."""
        ...

    async def look_up(self, database: str) -> None:
        """Read one tenant's published limits now, without waiting for its change message."""
        ...

    def wake(self, database: str) -> None:
        """Announce that a connection reached a Cold tenant, so it is marked awake."""
        ...

    def publish_cancel(self, backend_key: BackendKey, target: Target) -> None:
        """A client's backend key, so a CancelRequest that reaches another replica finds its PgBouncer."""
        ...

    def forget_cancel(self, backend_key: BackendKey) -> None:
        ...

    async def find_cancel(self, backend_key: BackendKey) -> Target | None:
        """The PgBouncer of a backend key another replica handed out, or None."""
        ...


class LocalOnly:
    """No other replicas: nothing to share, nothing to ask."""

    connected = False

    async def lease(self, owner: str, lanes: int, args: list[float]) -> list[int] | None:
        return None

    async def look_up(self, database: str) -> None:
        pass

    def wake(self, database: str) -> None:
        pass

    def publish_cancel(self, backend_key: BackendKey, target: Target) -> None:
        pass

    def forget_cancel(self, backend_key: BackendKey) -> None:
        pass

    async def find_cancel(self, backend_key: BackendKey) -> Target | None:
        return None
