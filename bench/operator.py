"""The operator at scale, against the real apiserver and backends.

    python -m bench.operator --tenants 1000 --changes 100
    python -m bench.operator --tenants 10000 --pool 10000 --shards 2 --apply-workers 8 --changes 0

- N TenantDatabases applied at once (kubectl apply, in --apply-workers parallel
  chunks): time until all are Ready, each operator's RSS now and at its peak.
  With --pool the default TierPolicy keeps that many databases ready, filled
  before the apply; with --shards M, M operators split the tenants (labelled by
  the apply, or with --unlabelled by the operators themselves).
- A drift round (a no-drift pass over each operator's tenants, 200 per engine
  pass) from the operators' metrics: its wall time and Postgres statements.
- API writes per steady-state minute (from the apiserver's own request counters).
- Tier change propagation: `kubectl patch` FREE->PRO until the role's CONNECTION
  LIMIT is live in Postgres, p50/p99 over M changes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench.common import ROOT, devstack
from dynabase.desired.warm_pool import like_pattern, pool_prefix
from dynabase.devstack.stack import free_port
from dynabase.kube.shards import SHARD_LABEL, shard_of
from dynabase.kubeapi import KubeApi, KubeApiError
from dynabase.settings import WARM_POOL_FILL_LOCK

PARTIAL_PASSES = 'dynabase_reconcile_duration_seconds_count{mode="partial"}'
ROUND_TENANTS = 'dynabase_operator_drift_round{measure="tenants"}'
ROUND_SECONDS = 'dynabase_operator_drift_round{measure="seconds"}'


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([env["DYNABASE_KUBECTL"], *args], env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
                         input=stdin, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


WRITES = ("PATCH", "POST", "PUT", "DELETE", "APPLY")


def write_requests(env: dict[str, str], verbs: tuple[str, ...] = WRITES) -> dict[str, float]:
    """Requests the apiserver has served (writes by default), by verb and resource."""
    out: dict[str, float] = {}
    for line in kubectl(env, "get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{") and any(f'verb="{v}"' in line for v in verbs):
            labels = dict(part.split("=", 1) for part in line[len("apiserver_request_total{"):].split("}")[0]
                          .split(","))
            key = f"{labels.get('verb', '').strip(chr(34))} {labels.get('resource', '').strip(chr(34))}" \
                  f"{'/' + labels['subresource'].strip(chr(34)) if labels.get('subresource', '') else ''}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """RSS now and at its peak (VmHWM), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def tenant_docs(count: int, shards: int, labelled: bool) -> list[str]:
    docs = []
    for i in range(count):
        name = f"t{i:05d}"
        labels = f", labels: {{{SHARD_LABEL}: '{shard_of('bench', name, shards)}'}}" if labelled and shards > 1 else ""
        docs.append("apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
                    f"metadata: {{name: {name}, namespace: bench{labels}}}\nspec: {{orgId: org-{i}, tier: FREE}}\n")
    return docs


def apply_all(env: dict[str, str], docs: list[str], workers: int) -> None:
    """Like one `kubectl apply` of them all, in ``workers`` parallel chunks (kubectl applies one at a time)."""
    chunks = [docs[i::workers] for i in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda chunk: kubectl(env, "apply", "-f", "-", stdin="---\n".join(chunk)), chunks))


def pool_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                           (like_pattern(pool_prefix("default")),)).fetchone()
    return int(row[0]) if row else 0


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


class ReadyWatch:
    """Counts Ready tenants from a watch (listing 10,000 objects every few seconds would load the apiserver)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.ready: set[str] = set()
        self.last = 0.0  # when the newest one became Ready
        self.stop = threading.Event()
        os.environ["KUBECONFIG"] = env["KUBECONFIG"]
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        path = "/apis/dynabase.io/v1alpha1/namespaces/bench/tenantdatabases"
        async with KubeApi() as api:
            while not self.stop.is_set():
                listed = await api.request("GET", path)
                for item in listed["items"]:
                    self._see(item)
                version = listed["metadata"]["resourceVersion"]
                try:
                    async for event in api.watch(path, "", version, asyncio.Event(), timeout=60):
                        self._see(event["object"])
                        if self.stop.is_set():
                            return
                except KubeApiError:
                    continue  # expired: list again

    def _see(self, obj: dict[str, Any]) -> None:
        name = obj.get("metadata", {}).get("name")
        if name and name not in self.ready and is_ready(obj):
            self.ready.add(name)
            self.last = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--steady-seconds", type=int, default=60)
    parser.add_argument("--drift-interval", type=float, default=60)
    parser.add_argument("--max-workers", type=int, default=1000)
    parser.add_argument("--settle-seconds", type=int, default=0, help="wait this long after all Ready first")
    parser.add_argument("--pool", type=int, default=0, help="warm pool size of the default TierPolicy")
    parser.add_argument("--shards", type=int, default=1, help="operators, each --shard i/M")
    parser.add_argument("--unlabelled", action="store_true", help="apply tenants without shard labels")
    parser.add_argument("--apply-workers", type=int, default=1, help="parallel kubectl apply processes")
    parser.add_argument("--stack-dir", help="put the devstack (Postgres' data) under this folder")
    parser.add_argument("--hold-refill", action="store_true",
                        help="after the pool is full, hold the fill lock: no refill during the run (bounds disk use)")
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer", "etcd", "kube-apiserver"], parent=args.stack_dir) as env:
        kubectl(env, "apply", "-k", str(ROOT / "crds"))
        kubectl(env, "wait", "--for=condition=Established", "crd/tenantdatabases.dynabase.io", "--timeout=60s")
        policy = yaml.safe_load((ROOT / "examples" / "tierpolicy-default.yaml").read_text())
        if args.pool:
            policy["spec"]["warmPool"] = {"size": args.pool}
        kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump(policy))
        kubectl(env, "create", "namespace", "bench")
        operators, metrics = [], []
        for shard in range(args.shards):
            metrics.append(free_port())
            log = open(Path(tempfile.gettempdir()) / f"dynabase-bench-operator-{shard}.log", "wb")  # noqa: SIM115
            operators.append(subprocess.Popen(
                [sys.executable, "-m", "dynabase.cli", "operator", "--metrics-port", str(metrics[-1]),
                 "--liveness-port", "0", "--drift-interval", str(args.drift_interval), "--concurrency", "8",
                 "--max-workers", str(args.max_workers), *(["--shard", f"{shard}/{args.shards}"] if args.shards > 1
                                                          else [])],
                env={**os.environ, **env, "DYNABASE_LOG_LEVEL": "WARNING"}, stdout=log, stderr=subprocess.STDOUT,
            ))
        try:
            run(env, args, operators, metrics)
        finally:
            for operator in operators:
                operator.terminate()
            for operator in operators:
                operator.wait(timeout=60)


def run(env: dict[str, str], args: argparse.Namespace, operators: list[subprocess.Popen[bytes]],
        metrics: list[int]) -> None:
    time.sleep(3)
    if args.pool:
        started = time.monotonic()
        # The operators fill it after their first pass; the first pass comes with the first tenant.
        kubectl(env, "apply", "-f", "-", stdin="---\n".join(tenant_docs(1, args.shards, not args.unlabelled)))
        while (count := pool_count(env["DYNABASE_POSTGRES_DSN"])) < args.pool:
            print(f"  pool {count}/{args.pool} after {time.monotonic() - started:.0f}s", flush=True)
            time.sleep(10)
        print(f"warm pool of {args.pool} filled in {time.monotonic() - started:.1f}s "
              f"({args.pool / (time.monotonic() - started):.1f} databases/s)", flush=True)
        if args.hold_refill:  # the operators' filler finds the lock taken, as if another engine were filling
            holder = psycopg.connect(env["DYNABASE_POSTGRES_DSN"], autocommit=True)
            holder.execute("SELECT pg_advisory_lock(%s)", (WARM_POOL_FILL_LOCK,))
    docs = tenant_docs(args.tenants, args.shards, not args.unlabelled)
    watch = ReadyWatch(env)
    served_before = write_requests(env, (*WRITES, "GET", "LIST"))
    started = time.monotonic()
    apply_all(env, docs, args.apply_workers)
    applied = time.monotonic() - started
    peak: dict[int, float] = {}
    while True:
        ready = len(watch.ready)
        elapsed = time.monotonic() - started
        for op in operators:
            peak[op.pid] = max(peak.get(op.pid, 0.0), memory_mb(op.pid)[0])
        print(f"  {elapsed:6.1f}s ready {ready}/{args.tenants}", flush=True)
        if ready == args.tenants or elapsed > 3600:
            break
        time.sleep(5)
    watch.stop.set()
    if ready == args.tenants:
        elapsed = watch.last - started
    rss = ", ".join(f"{memory_mb(op.pid)[0]:.0f} MB (peak {memory_mb(op.pid)[1]:.0f})" for op in operators)
    print(f"{args.tenants} TenantDatabases, {args.shards} operator(s), warm pool {args.pool}: applied in "
          f"{applied:.1f}s, all Ready after {elapsed:.1f}s; operator RSS {rss}", flush=True)
    served = {k: v - served_before.get(k, 0.0) for k, v in write_requests(env, (*WRITES, "GET", "LIST")).items()}
    busiest = sorted(((v, k) for k, v in served.items() if v >= args.tenants / 2), reverse=True)
    print(f"  apiserver requests until all Ready: {sum(served.values()):.0f} "
          f"({sum(served.values()) / elapsed:.0f}/s, {sum(served.values()) / args.tenants:.1f} per tenant; "
          f"{', '.join(f'{k} {v:.0f}' for v, k in busiest)}; the bench's own polling included)", flush=True)

    # One drift round per operator (a no-drift pass over its tenants, 200 per engine pass).
    rounds_before = [scrape(port).get(PARTIAL_PASSES, 0.0) for port in metrics]
    time.sleep(args.drift_interval * 1.5 + 5)
    for shard, port in enumerate(metrics):
        values = scrape(port)
        passes = values.get(PARTIAL_PASSES, 0.0) - rounds_before[shard]
        tenants, seconds = values.get(ROUND_TENANTS, 0.0), values.get(ROUND_SECONDS, 0.0)
        print(f"drift round, operator {shard}: {tenants:.0f} tenants in {seconds:.2f}s ({passes:.0f} engine passes "
              f"since), {values.get('dynabase_postgres_statements_total', 0):.0f} statements written in all; "
              f"RSS {memory_mb(operators[shard].pid)[0]:.0f} MB", flush=True)

    time.sleep(args.settle_seconds)
    before = write_requests(env)
    time.sleep(args.steady_seconds)
    after = write_requests(env)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    writes = sum(delta.values())
    # The apiserver renews its own identity lease and the kubernetes endpoints: not ours.
    ours = sum(v for k, v in delta.items() if not k.split()[-1].startswith(("leases", "endpoints")))
    print(f"steady state: {ours:.0f} API writes by the operators in {args.steady_seconds}s "
          f"({writes:.0f} in all: {delta}); RSS "
          f"{', '.join(f'{memory_mb(op.pid)[0]:.0f}' for op in operators)} MB", flush=True)

    if not args.changes:
        return
    latencies = []
    with psycopg.connect(env["DYNABASE_POSTGRES_DSN"], autocommit=True) as conn:
        for i in range(args.changes):
            name = f"t{i:05d}"
            started = time.monotonic()
            kubectl(env, "patch", "tdb", name, "-n", "bench", "--type=merge", "-p", '{"spec":{"tier":"PRO"}}')
            while True:
                limit = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
                if limit and limit[0] == 50:
                    break
                if time.monotonic() - started > 30:
                    raise SystemExit(f"{name}: PRO limit not live after 30s")
                time.sleep(0.01)
            latencies.append(time.monotonic() - started)
    latencies.sort()
    print(f"tier change propagation over {args.changes} patches (kubectl patch -> limit live): "
          f"p50 {statistics.median(latencies):.2f}s, p99 {latencies[int(len(latencies) * 0.99) - 1]:.2f}s, "
          f"max {latencies[-1]:.2f}s", flush=True)


if __name__ == "__main__":
    main()
