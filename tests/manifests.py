"""Bad manifests shared by the headless-validation tests and the apiserver tests.

Each case is a (name, yaml, expected message fragment) where the fragment must
appear both in `dynabase validate` output and in the apiserver's rejection, so
the two validators cannot drift apart.
"""

from __future__ import annotations

import textwrap

POLICY_HEAD = """\
apiVersion: dynabase.io/v1alpha1
kind: TierPolicy
metadata:
  name: {name}
spec:
  tiers:
"""


def policy(name: str, tiers: str) -> str:
    return POLICY_HEAD.format(name=name) + textwrap.indent(textwrap.dedent(tiers), "    ")


def tenant(name: str, spec: str, namespace: str = "default") -> str:
    return (
        "apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata:\n"
        f"  name: {name}\n  namespace: {namespace}\nspec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    )


# (case id, manifest, fragment expected from both validators)
SHARED_BAD = [
    (
        "burst-below-qps",
        policy("bad-burst", """\
        FREE:
          rank: 0
          proxy:
            qps: 100
            burst: 10
        """),
        "burst must be at least qps",
    ),
    (
        "pool-above-connection-limit",
        policy("bad-pool", """\
        FREE:
          rank: 0
          postgres:
            connectionLimit: 2
          pgbouncer:
            poolSize: 2
            reservePoolSize: 1
        """),
        "must not exceed postgres.connectionLimit",
    ),
    (
        "duplicate-rank",
        policy("bad-rank", """\
        FREE:
          rank: 1
        PRO:
          rank: 1
        """),
        "every tier needs its own rank",
    ),
    (
        "lower-case-tier-name",
        policy("bad-name", """\
        free:
          rank: 1
        """),
        "tier names must be upper case",
    ),
    (
        "reserved-database-name",
        tenant("reserved", """\
        orgId: org-x
        tier: FREE
        databaseName: postgres
        """),
        "databaseName is reserved for the platform",
    ),
    (
        "work-mem-in-bytes",
        policy("bad-workmem", """\
        FREE:
          rank: 0
          postgres:
            workMem: 4096B
        """),
        "workMem must be between 64kB and 2GB",
    ),
]
