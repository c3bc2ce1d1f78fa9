"""Tenant passwords: read from the secret store, generated only for a role that has none.

A role whose password no store knows keeps it: replacing it would lock out the
tenant's applications (a redeploy with an empty disk, a lost key, a deleted
Secret). The tenant reports SecretMissing with how to give the password back;
nothing is generated and no ``ALTER ROLE … PASSWORD`` is planned.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable

from dynabase.desired.postgres import Password, PostgresTarget
from dynabase.desired.postgres_observed import PostgresObserved
from dynabase.desired.sql import quote_ident

from .conditions import Outcome
from .results import TenantResult
from .stores import BulkSecretStore, SecretStore, generate_password

SECRET_CONDITION = "SecretReady"
# Store calls in flight: a Kubernetes Secret is one apiserver request each, and a pass of 200 new
# tenants reads and creates 200 of them; one at a time that was most of the pass.
STORE_CALLS = 8


async def for_each(results: Iterable[TenantResult], call: Callable[[TenantResult], Awaitable[None]]) -> None:
    """``call`` for each tenant, ``STORE_CALLS`` at a time."""
    slots = asyncio.Semaphore(STORE_CALLS)

    async def one(result: TenantResult) -> None:
        async with slots:
            await call(result)

    await asyncio.gather(*(one(r) for r in results))


def _failed(result: TenantResult, reason: str, message: str) -> None:
    result.outcomes.append(Outcome(SECRET_CONDITION, False, reason, message))


def secret_failed(result: TenantResult) -> bool:
    return any(o.condition_type == SECRET_CONDITION for o in result.outcomes)


async def load_passwords(secrets: SecretStore, results: list[TenantResult]) -> None:
    """Each tenant's stored password, in bulk where the store can (then one by one for the rest)."""
    known: dict[str, str | None] = {}
    if isinstance(secrets, BulkSecretStore) and results:
        try:
            known = await secrets.get_passwords([r.tenant for r in results])
        except Exception:  # read one by one below, where each failure is that tenant's condition
            known = {}

    async def load(result: TenantResult) -> None:
        value = known.get(result.key)
        result.password = Password(value) if value is not None else await stored_password(secrets, result)

    await for_each(results, load)


async def stored_password(secrets: SecretStore, result: TenantResult) -> Password | None:
    """The stored password; a store that cannot answer is this tenant's condition, not the pass's."""
    try:
        value = await secrets.get_password(result.tenant)
    except Exception as exc:  # the stores' messages name keys and variables, never a secret
        _failed(result, "SecretUnavailable", f"{type(exc).__name__}: {exc}")
        return None
    return Password(value) if value is not None else None


async def settle_passwords(secrets: SecretStore, results: list[TenantResult], targets: dict[str, PostgresTarget],
                           observed: PostgresObserved, dry_run: bool) -> None:
    """Give every active tenant without a stored password one, unless its role already has one."""
    async def settle(result: TenantResult) -> None:
        target = targets.get(result.key)
        if target is None or target.password is not None or secret_failed(result):
            return
        role = observed.roles.get(target.role)
        if role is not None and role.verifier and role.comment == target.marker:
            _failed(result, "SecretMissing", (
                f"role {target.role} has a password that no store holds, so none is generated: "
                f"{secrets.restore_hint(result.tenant)}; or, to give the tenant a new one, "
                f"ALTER ROLE {quote_ident(target.role)} PASSWORD NULL"))
            return
        if dry_run:
            return
        try:
            value = await secrets.create_password(result.tenant, generate_password())
        except Exception as exc:  # as above: this tenant's condition
            _failed(result, "SecretUnavailable", f"{type(exc).__name__}: {exc}")
            return
        targets[result.key] = dataclasses.replace(target, password=Password(value))
        result.password = targets[result.key].password

    await for_each(results, settle)
