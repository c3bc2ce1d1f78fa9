"""Operators split the tenants by a label: ``dynabase.io/shard=N`` for ``--shard N/M``.

The apiserver filters each operator's watch by its label (server-side), so an
operator lists, indexes and holds only its own tenants: memory and pass time
scale with the shard, not the cluster. Each shard has its own kopf peering
object, so two replicas of one shard are an active and a standby (peering.py).

Where the label comes from: the sign-up flow sets it (to ``shard_of`` below, or
any shard it likes), or, when it is absent or names no shard of M, the operators
set it to ``shard_of(namespace, name, M)``: a digest of the name, the same in
every operator (labeller.py). Every operator of a deployment must use the same M.
Pure: no kopf, so the command line can parse ``--shard`` cheaply.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SHARD_LABEL = "dynabase.io/shard"  # in the API group's domain (spec.GROUP), written out: no model import


def shard_of(namespace: str, name: str, count: int) -> int:
    """The shard a tenant without a (valid) label belongs to: stable across processes and versions."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``N/M``: shard N (from 0) of M."""
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError("expected N/M, e.g. 0/2 for the first of two shards")
        shard = cls(int(index), int(count))
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ValueError(f"shard {shard.index} does not exist among {shard.count}; N goes from 0 to M-1")
        return shard

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def selector(self) -> str:
        """The label selector of this shard's tenants."""
        return f"{SHARD_LABEL}={self.index}"

    @property
    def unassigned(self) -> str:
        """Tenants no shard of M selects: no label, or one outside 0..M-1 (``notin`` matches both)."""
        return f"{SHARD_LABEL} notin ({','.join(str(i) for i in range(self.count))})"

    def owns(self, namespace: str, name: str) -> bool:
        return shard_of(namespace, name, self.count) == self.index

    def peering_name(self, base: str) -> str:
        return f"{base}-shard-{self.index}" if self.sharded else base

    @property
    def field_manager(self) -> str:
        """Who wrote a tenant's status, as the apiserver records it (managedFields)."""
        return f"dynabase-operator-shard-{self.index}-of-{self.count}" if self.sharded else "dynabase-operator"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


UNSHARDED = Shard(0, 1)
