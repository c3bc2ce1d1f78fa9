"""What bench/faults.py measures while it breaks things: traffic through the proxy, the
proxy's metering, whether restrictions are in force, whether the tenants converged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import redis

from dynabase.keyspace import LIMITS_KEY, USAGE_PATTERN, decode_usage, encode_usage, usage_field, usage_key

NAMESPACE = "faults"
RESTRICTED_QPS = 2


@dataclass
class Tenant:
    name: str
    tier: str
    railway: bool = False

    @property
    def key(self) -> str:
        return f"{NAMESPACE}/{self.name}"

    @property
    def database(self) -> str:
        return self.name.replace("-", "_")

    def manifest(self) -> str:
        railway = (f", railway: {{projectId: proj, environmentId: env, serviceName: {self.name}}}"
                   if self.railway else "")
        return (f"apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\nmetadata: {{name: {self.name}, "
                f"namespace: {NAMESPACE}}}\nspec: {{orgId: org-{self.name}, tier: {self.tier}, "
                f"tierPolicyRef: faults{railway}}}\n")


@dataclass
class Traffic:
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


class Probes:
    def __init__(self, env: dict[str, str], tenants: list[Tenant], proxy_port: int, replica: str) -> None:
        self.env, self.tenants, self.proxy_port, self.replica = env, tenants, proxy_port, replica
        self.passwords: dict[str, str] = {}
        self.traffic = Traffic()

    def statuses(self) -> dict[str, dict[str, Any]] | None:
        out = subprocess.run([self.env["DYNABASE_KUBECTL"], "get", "tdb", "-n", NAMESPACE, "-o", "json"],
                             capture_output=True, text=True, env={**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]},
                             timeout=30)
        if out.returncode != 0:
            return None  # the apiserver is away
        return {f"{NAMESPACE}/{i['metadata']['name']}": i.get("status") or {} for i in json.loads(out.stdout)["items"]}

    def converged(self, statuses: dict[str, dict[str, Any]] | None) -> bool:
        if statuses is None:
            return False
        for t in self.tenants:
            status = statuses.get(t.key, {})
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
            if not ready or status.get("appliedTier") != t.tier:
                return False
        return True

    def explain(self, statuses: dict[str, dict[str, Any]] | None) -> None:
        """Why the tenants are not converged: their tier and failing conditions."""
        for t in self.tenants:
            status = (statuses or {}).get(t.key, {})
            failing = [f"{c['type']}: {c.get('reason')}: {c.get('message', '')[:160]}"
                       for c in status.get("conditions", []) if c["status"] == "False" and c["type"] != "Ready"]
            print(f"    {t.key}: want {t.tier}, applied {status.get('appliedTier')}; {failing}", flush=True)

    # -- traffic, usage and restrictions ------------------------------------------------------

    async def client(self, t: Tenant, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(host="127.0.0.1", port=self.proxy_port, user=t.database,
                                                 password=self.passwords[t.key], database=t.database, ssl=False,
                                                 statement_cache_size=0, timeout=5)
                await conn.fetchval("SELECT 1", timeout=10)
                self.traffic.ok[t.key] += 1
                await asyncio.sleep(0.02)
            except asyncpg.PostgresError as exc:
                self.traffic.errors[str(exc.sqlstate)] += 1
                await asyncio.sleep(0.1)
            except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.traffic.errors[type(exc).__name__] += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.1)
        if conn is not None:
            conn.terminate()

    def metered(self) -> Counter[str]:
        """Queries the proxy replica wrote to the usage hashes, per tenant."""
        client = redis.Redis.from_url(self.env["DYNABASE_REDIS_URL"], decode_responses=True)
        totals: Counter[str] = Counter()
        try:
            for key in client.scan_iter(USAGE_PATTERN):
                for sample in decode_usage({str(k): str(v) for k, v in client.hgetall(key).items()}):
                    if sample.replica == self.replica:
                        totals[sample.tenant] += int(sample.counters.get("queries", 0))
        finally:
            client.close()
        return totals

    async def settled_metering(self) -> Counter[str]:
        """The usage hashes once the proxy's flushes have caught up with the (stopped) clients."""
        last, stable_since = Counter[str](), time.monotonic()
        while time.monotonic() - stable_since < 3:  # three flushes with nothing new
            now = await asyncio.to_thread(self.metered)
            if now != last:
                last, stable_since = now, time.monotonic()
            await asyncio.sleep(0.5)
        return last

    async def seed_usage(self, stop: asyncio.Event, over: list[Tenant]) -> None:
        """A replica that metered the restricted tenants over their included usage, rewriting its
        absolute counters every second as proxies do (so it survives Redis losing its data)."""
        client = redis.Redis.from_url(self.env["DYNABASE_REDIS_URL"], decode_responses=True)
        hour = int(time.time()) // 3600
        try:
            while not stop.is_set():
                with contextlib.suppress(redis.RedisError):
                    client.hset(usage_key(hour), mapping={
                        usage_field(t.key, "seed"): encode_usage({"queries": 10, "query_seconds": 100.0}, t.tier)
                        for t in over})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            client.close()

    def restrictions(self, slow: Tenant, read_only: Tenant, statuses: dict[str, dict[str, Any]] | None) -> int:
        """How many restrictions are not in force right now (what cannot be read is not counted)."""
        lifted = 0
        with contextlib.suppress(psycopg.Error), \
                psycopg.connect(self.env["DYNABASE_POSTGRES_DSN"], connect_timeout=2) as conn:
            row = conn.execute("SELECT coalesce(rolconfig, '{}') FROM pg_roles WHERE rolname = %s",
                               (read_only.database,)).fetchone()
            if row is not None and "default_transaction_read_only=on" not in row[0]:
                lifted += 1
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(self.env["DYNABASE_REDIS_URL"], decode_responses=True, socket_timeout=2)
            try:
                text = client.hget(LIMITS_KEY, slow.database)
            finally:
                client.close()
            if text and (json.loads(text).get("qps") or 10 ** 9) > RESTRICTED_QPS:
                lifted += 1
        for t in (slow, read_only):
            if statuses is not None and not (statuses.get(t.key, {}).get("usage") or {}).get("restriction"):
                lifted += 1
        return lifted
