"""The operator at scale, against the real apiserver and backends.

    python -m bench.operator --tenants 1000 --changes 100

- N TenantDatabases applied at once: time until all are Ready, operator RSS.
- API writes per steady-state minute (from the apiserver's own request counters).
- Tier change propagation: `kubectl patch` FREE->PRO until the role's CONNECTION
  LIMIT is live in Postgres, p50/p99 over M changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench.common import ROOT, devstack


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([env["DYNABASE_KUBECTL"], *args], env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
                         input=stdin, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


def write_requests(env: dict[str, str]) -> dict[str, float]:
    """Write requests the apiserver has served, by verb and resource."""
    out: dict[str, float] = {}
    for line in kubectl(env, "get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{") and any(
            f'verb="{v}"' in line for v in ("PATCH", "POST", "PUT", "DELETE", "APPLY")
        ):
            labels = dict(part.split("=", 1) for part in line[len("apiserver_request_total{"):].split("}")[0]
                          .split(","))
            key = f"{labels.get('verb', '').strip(chr(34))} {labels.get('resource', '').strip(chr(34))}" \
                  f"{'/' + labels['subresource'].strip(chr(34)) if labels.get('subresource', '') else ''}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--steady-seconds", type=int, default=60)
    parser.add_argument("--drift-interval", type=float, default=60)
    parser.add_argument("--max-workers", type=int, default=1000)
    parser.add_argument("--settle-seconds", type=int, default=0, help="wait this long after all Ready first")
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer", "etcd", "kube-apiserver"]) as env:
        kubectl(env, "apply", "-k", str(ROOT / "crds"))
        kubectl(env, "wait", "--for=condition=Established", "crd/tenantdatabases.dynabase.io", "--timeout=60s")
        kubectl(env, "apply", "-f", str(ROOT / "examples" / "tierpolicy-default.yaml"))
        kubectl(env, "create", "namespace", "bench")
        log = open(Path(tempfile.gettempdir()) / "dynabase-bench-operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(
            [sys.executable, "-m", "dynabase.cli", "operator", "--metrics-port", "0", "--liveness-port", "0",
             "--drift-interval", str(args.drift_interval), "--concurrency", "8",
             "--max-workers", str(args.max_workers)],
            env={**os.environ, **env, "DYNABASE_LOG_LEVEL": "WARNING"}, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(3)
            docs = [
                "apiVersion: dynabase.io/v1alpha1\nkind: TenantDatabase\n"
                f"metadata: {{name: t{i:05d}, namespace: bench}}\nspec: {{orgId: org-{i}, tier: FREE}}\n"
                for i in range(args.tenants)
            ]
            started = time.monotonic()
            kubectl(env, "apply", "-f", "-", stdin="---\n".join(docs))
            applied = time.monotonic() - started
            ready = 0
            while True:
                items = json.loads(kubectl(env, "get", "tdb", "-n", "bench", "-o", "json"))["items"]
                ready = sum(
                    any(c["type"] == "Ready" and c["status"] == "True"
                        for c in i.get("status", {}).get("conditions", []))
                    for i in items
                )
                elapsed = time.monotonic() - started
                print(f"  {elapsed:6.1f}s ready {ready}/{args.tenants}", flush=True)
                if ready == args.tenants or elapsed > 900:
                    break
                time.sleep(5)
            print(f"{args.tenants} TenantDatabases: applied in {applied:.1f}s, all Ready after {elapsed:.1f}s; "
                  f"operator RSS {rss_mb(operator.pid):.0f} MB", flush=True)

            time.sleep(args.settle_seconds)
            before = write_requests(env)
            time.sleep(args.steady_seconds)
            after = write_requests(env)
            delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
            writes = sum(delta.values())
            # The apiserver renews its own identity lease and the kubernetes endpoints: not ours.
            ours = sum(v for k, v in delta.items() if not k.split()[-1].startswith(("leases", "endpoints")))
            print(f"steady state: {ours:.0f} API writes by the operator in {args.steady_seconds}s "
                  f"({writes:.0f} in all: {delta}) "
                  f"(drift timers ran over all {args.tenants} tenants); operator RSS {rss_mb(operator.pid):.0f} MB",
                  flush=True)

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
        finally:
            operator.terminate()
            operator.wait(timeout=30)


if __name__ == "__main__":
    main()
