"""Sign-up speed: a new tenant declared -> its first query answered through the proxy.

    python -m bench.signup --signups 50 --mode both

- engine: the engine pass for the one new tenant (what headless mode and
  `dynabase apply` run; Postgres, PgBouncer layout, proxy limits), then connect +
  SELECT 1 through a proxy process.
- operator: a `dynabase operator` process; the TenantDatabase is POSTed to the
  apiserver (its Secret with a known password made beforehand, as a sign-up flow
  would), then a watch waits for Ready, then connect + SELECT 1 through the proxy.

Each mode runs with a warm pool (filled before the first sign-up and refilled in
the background while they run) and, with --compare, without one (CREATE DATABASE).
Prints p50/p99/max of each step (goal: apply -> first query p99 <= 250 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import kopf
import yaml

from bench.common import ROOT, devstack, proxy_engine, tenants
from bench.proxy import start_proxy
from dynabase.desired.warm_pool import pool_prefix
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine
from dynabase.kubeapi import KubeApi, connection_info, session
from dynabase.spec import TenantDatabase, TierPolicy


def signup_policy(name: str, pool: int) -> dict[str, Any]:
    """The example tiers under their own name: each run has its own pool (and none when ``pool`` is 0)."""
    raw = yaml.safe_load((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
    raw["metadata"]["name"] = name
    if pool:
        raw["spec"]["warmPool"] = {"size": pool}
    return dict(raw)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(label: str, values: list[float]) -> str:
    return f"{label:<34} p50 {pct(values, 0.5):7.1f} ms  p99 {pct(values, 0.99):7.1f} ms  max {max(values):7.1f} ms"


async def first_query(port: int, database: str, password: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user=database, password=password, database=database,
                                 ssl=False, statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def until_served(port: int, database: str, password: str) -> None:
    """A new policy's tier gets its own PgBouncer, started by the agent: the first tenant of a policy waits
    for it (once per policy, not per sign-up), so each run starts with one tenant served."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await first_query(port, database, password)
        except asyncpg.CannotConnectNowError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def pool_count(dsn: str, policy: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname LIKE $1",
                                       pool_prefix(policy).replace("_", "\\_") + "%"))
    finally:
        await conn.close()


def report(mode: str, pool: int, timings: dict[str, list[float]], extra: str = "") -> None:
    print(f"\n{mode}, warm pool {pool or 'off'}, {len(timings['total'])} sign-ups{extra}:")
    for label, values in timings.items():
        print("  " + summary(label, values), flush=True)


# -- engine: the pass for the new tenant -----------------------------------------------------------

async def engine_mode(env: dict[str, str], signups: int, pool: int, existing: int, proxy_port: int) -> None:
    engine, secrets = await proxy_engine(env)
    name = f"engine-{pool}"
    policies = {name: TierPolicy.model_validate(signup_policy(name, pool)),
                "default": TierPolicy.model_validate(signup_policy("default", 0))}
    try:
        if existing:  # a platform with tenants already: the layout and the catalog are not empty
            engine.warm_pool.refill = False
            await engine.reconcile_all({"default": policies["default"]}, tenants(existing, prefix=f"e{pool}"))
            engine.warm_pool.refill = True
        if pool:
            await engine.bootstrap()
            engine.warm_pool.want({name: pool})
            started = time.monotonic()
            await engine.warm_pool.until_full()
            print(f"warm pool of {pool} filled in {time.monotonic() - started:.1f}s", flush=True)
        timings: dict[str, list[float]] = {"engine pass (apply)": [], "first query through the proxy": [],
                                           "total": []}
        for i in range(-1, signups):  # -1: the policy's first tenant, untimed
            tenant = TenantDatabase.model_validate({
                "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                "metadata": {"name": f"s{pool}-{i:04d}", "namespace": "bench", "generation": 1},
                "spec": {"orgId": f"org-s{i}", "tier": "FREE", "tierPolicyRef": name},
            })
            started = time.perf_counter()
            result = await engine.reconcile_all(policies, [tenant])
            passed = time.perf_counter()
            assert result.tenants[0].ready, result.tenants[0].outcomes
            if i < 0:
                await until_served(proxy_port, tenant.database_name, secrets.passwords[tenant.key])
                continue
            await first_query(proxy_port, tenant.database_name, secrets.passwords[tenant.key])
            done = time.perf_counter()
            timings["engine pass (apply)"].append((passed - started) * 1000)
            timings["first query through the proxy"].append((done - passed) * 1000)
            timings["total"].append((done - started) * 1000)
        report("engine pass (headless / dynabase apply)", pool, timings,
               f", {engine.warm_pool.created} pool databases made meanwhile" if pool else "")
    finally:
        await close_engine(engine)


# -- operator: POST -> Ready -> first query ----------------------------------------------------------

def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([env["DYNABASE_KUBECTL"], *args], env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
                         input=stdin, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


async def wait_ready(http: aiohttp.ClientSession, server: str, namespace: str, name: str) -> None:
    path = (f"{server}/apis/dynabase.io/v1alpha1/namespaces/{namespace}/tenantdatabases"
            f"?watch=1&fieldSelector=metadata.name%3D{name}&timeoutSeconds=60")
    async with http.get(path) as response:
        async for line in response.content:
            obj = json.loads(line)["object"]
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in obj.get("status", {}).get("conditions", [])):
                return
    raise SystemExit(f"{name}: not Ready within 60 s")


async def operator_mode(env: dict[str, str], signups: int, pool: int, proxy_port: int, namespace: str) -> None:
    policy = f"operator-{pool}"
    kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump(signup_policy(policy, pool)))
    kubectl(env, "create", "namespace", namespace)
    log = open(Path(env["DYNABASE_DEVSTACK_DIR"]) / f"operator-signup-{pool}.log", "wb")  # noqa: SIM115
    operator = subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "operator", "--namespace", namespace, "--metrics-port", "0",
         "--liveness-port", "0", "--drift-interval", "60"],
        env={**os.environ, **env, "DYNABASE_LOG_LEVEL": "WARNING"}, stdout=log, stderr=subprocess.STDOUT,
    )
    os.environ["KUBECONFIG"] = env["KUBECONFIG"]
    info = connection_info(kopf.OperatorSettings())
    http = session(info, 4)
    api = KubeApi()
    try:
        if pool:
            started = time.monotonic()
            while await pool_count(env["DYNABASE_POSTGRES_DSN"], policy) < pool:
                await asyncio.sleep(0.5)
            print(f"operator filled the warm pool of {pool} in {time.monotonic() - started:.1f}s", flush=True)
        else:
            await asyncio.sleep(3)
        timings: dict[str, list[float]] = {"POST TenantDatabase": [], "-> Ready (watch)": [],
                                           "-> first query through the proxy": [], "total": []}
        base = f"/apis/dynabase.io/v1alpha1/namespaces/{namespace}/tenantdatabases"
        for i in range(-1, signups):  # -1: the policy's first tenant, untimed
            name, password = f"o{pool}-{i:04d}", f"pw-{os.urandom(8).hex()}"
            await api.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-pw"},
                "data": {"password": base64.b64encode(password.encode()).decode()}})
            body = {"apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {"orgId": f"org-{name}", "tier": "FREE", "tierPolicyRef": policy,
                             "passwordSecretRef": {"name": f"{name}-pw"}}}
            started = time.perf_counter()
            await api.request("POST", base, body)
            posted = time.perf_counter()
            await wait_ready(http, info.server.rstrip("/"), namespace, name)
            ready = time.perf_counter()
            if i < 0:
                await until_served(proxy_port, name.replace("-", "_"), password)
                continue
            await first_query(proxy_port, name.replace("-", "_"), password)
            done = time.perf_counter()
            timings["POST TenantDatabase"].append((posted - started) * 1000)
            timings["-> Ready (watch)"].append((ready - posted) * 1000)
            timings["-> first query through the proxy"].append((done - ready) * 1000)
            timings["total"].append((done - started) * 1000)
        report("operator (POST -> handler -> pass -> Ready -> first query)", pool, timings)
        kubectl_ms = []
        for i in range(5):  # what `kubectl apply` adds for a person at a terminal (a Go process, GET + POST)
            started = time.perf_counter()
            kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump({**body, "metadata": {
                "name": f"k{pool}-{i}", "namespace": namespace}}))
            kubectl_ms.append((time.perf_counter() - started) * 1000)
        print(f"  `kubectl apply` of one TenantDatabase alone: {min(kubectl_ms):.0f}-{max(kubectl_ms):.0f} ms",
              flush=True)
    finally:
        await http.close()
        await api.close()
        operator.terminate()
        operator.wait(30)


async def run(env: dict[str, str], args: argparse.Namespace) -> None:
    proxy_port, metrics = free_port(), free_port()
    proxy = start_proxy({"DYNABASE_REDIS_URL": env["DYNABASE_REDIS_URL"]}, proxy_port, metrics, "signup-bench")
    try:
        for pool in ([args.pool, 0] if args.compare else [args.pool]):
            if args.mode in ("engine", "both"):
                await engine_mode(env, args.signups, pool, args.existing, proxy_port)
            if args.mode in ("operator", "both"):
                await operator_mode(env, args.signups, pool, proxy_port, f"signup-{pool}")
    finally:
        proxy.terminate()
        proxy.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signups", type=int, default=50)
    parser.add_argument("--pool", type=int, default=60, help="warm pool size (filled before the first sign-up)")
    parser.add_argument("--existing", type=int, default=200, help="tenants already there (engine mode)")
    parser.add_argument("--mode", choices=["engine", "operator", "both"], default="both")
    parser.add_argument("--compare", action="store_true", help="also run without a warm pool")
    args = parser.parse_args()
    services = ["postgres", "redis", "pgbouncer", *(["etcd", "kube-apiserver"] if args.mode != "engine" else [])]
    with devstack(services) as env:
        if args.mode != "engine":
            kubectl(env, "apply", "-k", str(ROOT / "crds"))
            kubectl(env, "wait", "--for=condition=Established", "crd/tenantdatabases.dynabase.io", "--timeout=60s")
        asyncio.run(run(env, args))


if __name__ == "__main__":
    main()
