"""Proxy cost and limiter accuracy, side by side in one run.

    python -m bench.proxy [--seconds 6] [--rounds 3] [--modes simple,extended] [--kernel-splice auto|off]
                          [--pin] [--busy-poll-us 300] [--skip-throughput]

1. pgbench -S (select-only) at 1, 8 and 50 clients, in each mode, through three paths
   in front of the same PgBouncer pool: PgBouncer alone, HAProxy (Debian's, TCP mode,
   one thread: a relay with no logic, the anchor) and the proxy. Runs alternate
   between the three, --rounds times; the table has medians (with the range), the
   ratios proxy/PgBouncer, proxy/HAProxy and HAProxy/PgBouncer, at 1 client the p99
   latency of each, and at 8 and 50 the CPU time per transaction of each process
   kind (from /proc, last round), which shows what each hop costs on shared cores.
   With --pin the relays get a CPU of their own (as a separate service would) and
   the database side shares the other.
2. Limiter: one tenant limited to 200 q/s (throttle), offered far more for 10 s,
   through 1 proxy process and then through 3: admitted rate against the limit,
   Redis leases per admitted query.
3. Metering: queries counted by the proxies (flushed to Redis) vs pgbench's count,
   and what the counting costs on the hot path (bench.proxy_path: the proxy's
   per-query Python work without sockets, and the metering share of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import proxy_path
from bench.common import devstack
from bench.haproxy import start_haproxy
from dynabase.backends.pgbouncer import PgBouncerBackend
from dynabase.backends.postgres import PostgresBackend
from dynabase.backends.proxy import ProxyBackend
from dynabase.devstack.stack import free_port
from dynabase.engine.reconciler import Engine
from dynabase.engine.stores import MemorySecretStore, MemoryStatusStore
from dynabase.keyspace import USAGE_PATTERN, decode_usage
from dynabase.spec import TenantDatabase, TierPolicy
from dynabase.usage.sampler import user_system_ticks

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "bench"},
    "spec": {"tiers": {
        "BENCH": {"rank": 1, "postgres": {"connectionLimit": 120},
                  "pgbouncer": {"poolSize": 60, "poolMode": "session"}, "proxy": {"maxConnections": 500}},
        "LIMITED": {"rank": 0, "postgres": {"connectionLimit": 60},
                    "pgbouncer": {"poolSize": 20, "poolMode": "transaction"},
                    "proxy": {"maxConnections": 500, "qps": 200, "burst": 200, "overLimit": "throttle",
                              "queueTimeout": "30s"}},
    }},
})


def tenant(db: str, tier: str) -> TenantDatabase:
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "bench"},
        "spec": {"orgId": "bench", "tier": tier, "tierPolicyRef": "bench", "databaseName": db},
    })


def pgbench(port: int, db: str, password: str, *, clients: int, mode: str, seconds: int,
            log_dir: Path | None = None, script: Path | None = None) -> tuple[float, int, list[float]]:
    args = ["pgbench", "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-M", mode,
            "-h", "127.0.0.1", "-p", str(port), "-U", db, db]
    args += ["-f", str(script)] if script else ["-S"]
    if log_dir is not None:
        for old in glob.glob(str(log_dir / "pgbench_log*")):
            os.unlink(old)
        args += ["-l", "--log-prefix", str(log_dir / "pgbench_log")]
    out = subprocess.run(args, env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench failed: {out.stderr}")
    tps = float(next(line for line in out.stdout.splitlines() if line.startswith("tps")).split()[2])
    count = int(next(line for line in out.stdout.splitlines() if "actually processed" in line).split()[-1]
                .split("/")[0])
    latencies: list[float] = []
    if log_dir is not None:
        for path in glob.glob(str(log_dir / "pgbench_log*")):
            latencies += [int(line.split()[2]) / 1000 for line in Path(path).read_text().splitlines() if line]
    return tps, count, latencies


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pin_processes(relays: dict[str, int]) -> None:
    """Every thread of the relays (proxy, HAProxy) onto CPU 1; Postgres (new backends inherit
    it from the postmaster), PgBouncer and this process (so pgbench) onto CPU 0."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if int(pid) in relays.values():
            cpu = 1
        elif (command.startswith("postgres") or "/bin/postgres " in command
              or ("pgbouncer" in command and "agent" not in command) or int(pid) == os.getpid()):
            cpu = 0
        else:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(thread), {cpu})


def cpu_seconds(relays: dict[str, int]) -> dict[str, float]:
    """CPU time so far (user + system, from /proc) of the processes a pgbench run goes through,
    by kind; each relay's (proxy, haproxy) split into user and system time. Kernel work done
    for the proxy's spliced connections in softirq and kworkers is charged to whoever the CPU
    was running, mostly pgbench, PgBouncer and Postgres."""
    totals: dict[str, float] = {}
    by_pid = {pid: name for name, pid in relays.items()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        user, system = (ticks / CLOCK_TICKS for ticks in user_system_ticks(stat))
        if int(pid) in by_pid:
            totals[f"{by_pid[int(pid)]} user"] = user
            totals[f"{by_pid[int(pid)]} sys"] = system
            continue
        if "pgbouncer" in command and "agent" not in command:
            kind = "pgbouncer"
        elif command.startswith("postgres") or "/bin/postgres " in command:
            kind = "postgres"
        elif "(kworker/" in stat.split(")", 1)[0]:  # where the kernel's sockmap redirects run
            kind = "kworkers"
        else:
            continue
        totals[kind] = totals.get(kind, 0.0) + user + system
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench, once it has exited
    totals["pgbench"] = children.ru_utime + children.ru_stime
    return totals


def cpu_per_transaction(before: dict[str, float], after: dict[str, float], transactions: int) -> str:
    used = {kind: (after.get(kind, 0.0) - before.get(kind, 0.0)) / max(transactions, 1) * 1e6 for kind in after}
    used = {kind: value for kind, value in used.items() if value >= 0.05}
    parts = ", ".join(f"{kind} {value:.1f}" for kind, value in sorted(used.items()))
    return f"{sum(used.values()):.1f} us ({parts})"


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[max(0, int(len(values) * 0.99) - 1)]


def start_proxy(env: dict[str, str], port: int, metrics: int, replica: str,
                busy_poll_us: int = 0, kernel_splice: str = "auto") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynabase.cli", "proxy", "--listen", f"127.0.0.1:{port}",
         "--metrics-port", str(metrics), "--replica-id", replica, "--busy-poll-us", str(busy_poll_us),
         "--kernel-splice", kernel_splice],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=1)
            time.sleep(0.5)
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("proxy did not start")


@dataclass
class Column:
    """One path's runs at one mode and client count."""

    tps: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    cpu: str = ""

    def median(self) -> float:
        return statistics.median(self.tps)

    def spread(self) -> str:
        return f"{min(self.tps):.0f}-{max(self.tps):.0f}"


def throughput(paths: dict[str, int], relays: dict[str, int], db: str, password: str, *, modes: list[str],
               seconds: int, rounds: int, logs: Path) -> tuple[int, int]:
    """pgbench -S through each path, alternating, ``rounds`` times; prints medians and ratios.
    Returns how many transactions and pgbench runs went through the proxy."""
    through_proxy = runs = 0
    print(f"== pgbench -S, {seconds} s runs alternating PgBouncer alone / HAProxy / proxy, medians of {rounds}",
          flush=True)
    print(f"{'mode':<9}{'clients':>8}{'pgbouncer':>11}{'haproxy':>9}{'proxy':>8}{'proxy/pgb':>11}"
          f"{'proxy/hap':>11}{'hap/pgb':>9}   (ranges; p99 at 1 client; CPU us per transaction, last round)",
          flush=True)
    for mode in modes:
        for clients in (1, 8, 50):
            columns = {name: Column() for name in paths}
            for _ in range(rounds):
                for name, port in paths.items():
                    before = cpu_seconds(relays)
                    tps, count, latencies = pgbench(port, db, password, clients=clients, mode=mode,
                                                    seconds=seconds, log_dir=logs if clients == 1 else None)
                    columns[name].tps.append(tps)
                    if name == "proxy":
                        through_proxy, runs = through_proxy + count, runs + 1
                    if latencies:
                        columns[name].p99_us.append(p99(latencies) * 1000)
                    if clients > 1:
                        columns[name].cpu = cpu_per_transaction(before, cpu_seconds(relays), count)
            base, hap, prox = (columns[n].median() for n in ("pgbouncer", "haproxy", "proxy"))
            ranges = ", ".join(c.spread() for c in columns.values())
            line = (f"{mode:<9}{clients:>8}{base:>11.0f}{hap:>9.0f}{prox:>8.0f}{prox / base:>11.2f}"
                    f"{prox / hap:>11.2f}{hap / base:>9.2f}   ranges {ranges}")
            if clients == 1:
                p99s = {n: statistics.median(c.p99_us) for n, c in columns.items()}
                line += (f"; p99 {p99s['pgbouncer']:.0f} / {p99s['haproxy']:.0f} / {p99s['proxy']:.0f} us"
                         f" (proxy - haproxy {p99s['proxy'] - p99s['haproxy']:+.0f} us)")
            print(line, flush=True)
            if clients > 1:
                for name, column in columns.items():
                    print(f"{'':17}CPU per transaction, {name}: {column.cpu}", flush=True)
    return through_proxy, runs


def counted_queries(redis_url: str, tenant: str) -> int:
    """Queries the proxies' usage flushes recorded for a tenant."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(int(sample.counters["queries"]) for key in client.scan_iter(USAGE_PATTERN)
                   for sample in decode_usage(client.hgetall(key)) if sample.tenant == tenant)
    finally:
        client.close()


def scrape(metrics: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def setup(env: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    postgres = PostgresBackend(env["DYNABASE_POSTGRES_DSN"])
    await postgres.start()
    secrets = MemorySecretStore()
    engine = Engine(postgres=postgres, pgbouncer=PgBouncerBackend(env["DYNABASE_REDIS_URL"]),
                    proxy=ProxyBackend(env["DYNABASE_REDIS_URL"]), secrets=secrets,
                    status_store=MemoryStatusStore())
    tenants = [tenant("bench_main", "BENCH"), tenant("bench_limited", "LIMITED")]
    result = await engine.reconcile_all({"bench": POLICY}, tenants, complete=True)
    assert all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    ports = {}
    for t in tenants:
        route = await engine.pgbouncer.route(t.database_name)  # type: ignore[union-attr]
        assert route is not None
        ports[t.database_name] = route[1]
    passwords = {t.database_name: secrets.passwords[t.key] for t in tenants}
    await postgres.close()
    return passwords, ports


def offer_limited(ports: list[tuple[int, int]], db: str, password: str, script: Path, *, clients: int) -> int:
    """pgbench through each proxy at once for 10 s; prints admitted rate and leases per query."""
    leases_before = sum(scrape(m, "dynabase_proxy_redis_leases") for _, m in ports)
    results: list[tuple[float, int, list[float]]] = []

    async def offer() -> None:
        loop = asyncio.get_running_loop()
        runs = [loop.run_in_executor(None, lambda p=p: pgbench(p, db, password, clients=clients, mode="simple",
                                                               seconds=10, script=script))
                for p, _ in ports]
        results.extend(await asyncio.gather(*runs))

    started = time.monotonic()
    asyncio.run(offer())
    elapsed = time.monotonic() - started
    admitted = sum(count for _, count, _ in results)
    leases = sum(scrape(m, "dynabase_proxy_redis_leases") for _, m in ports) - leases_before
    limit_total = 200 * 10 + 200
    print(f"{len(ports)} proxies: admitted {admitted} in {elapsed:.1f}s -> {admitted / 10:.1f} q/s: "
          f"{admitted / limit_total:.3f} of limit*10s+burst; per proxy {[c for _, c, _ in results]}; "
          f"Redis leases per admitted query {leases / max(admitted, 1):.4f} ({leases:.0f} leases)", flush=True)
    return admitted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per path; the table has medians")
    parser.add_argument("--modes", default="simple,extended", help="pgbench -M modes, comma-separated")
    parser.add_argument("--skip-throughput", action="store_true", help="only the limiter and metering parts")
    parser.add_argument("--skip-limiter", action="store_true", help="only the throughput part")
    parser.add_argument("--busy-poll-us", type=int, default=0, help="the proxy's --busy-poll-us (default 0 = off)")
    parser.add_argument("--kernel-splice", default="auto", choices=("auto", "on", "off"),
                        help="the proxy's --kernel-splice (off: forward in Python)")
    parser.add_argument("--pin", action="store_true",
                        help="the relays on CPU 1, everything else (Postgres, PgBouncer, pgbench) on CPU 0, as when "
                             "the proxy runs as a service of its own; every column is measured so")
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        passwords, pool_ports = asyncio.run(setup(env))
        db, pw = "bench_main", passwords["bench_main"]
        subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", env["PGPORT"], "-U", db, db],
                       env={**os.environ, "PGPASSWORD": pw}, check=True, capture_output=True)
        proxy_port, metrics, haproxy_port = free_port(), free_port(), free_port()
        logs = Path(tempfile.mkdtemp(prefix="dynabase-bench-proxy-"))
        proxies = [start_proxy(env, proxy_port, metrics, "bench-0", args.busy_poll_us, args.kernel_splice)]
        haproxy = start_haproxy(haproxy_port, pool_ports[db], logs)
        relays = {"proxy": proxies[0].pid, "haproxy": haproxy.pid}
        if args.pin:
            pin_processes(relays)
        try:
            spliced = scrape(metrics, "dynabase_proxy_kernel_splice ")
            print(f"proxy: kernel splice {'on' if spliced else 'off'} (--kernel-splice {args.kernel_splice})",
                  flush=True)
            if not args.skip_throughput:
                paths = {"pgbouncer": pool_ports[db], "haproxy": haproxy_port, "proxy": proxy_port}
                through_proxy, runs = throughput(paths, relays, db, pw, modes=args.modes.split(","),
                                                 seconds=args.seconds, rounds=args.rounds, logs=logs)
                time.sleep(2.5)  # a flush or two
                # Each pgbench run also sends two queries of its own (the scale, and whether tables are partitioned).
                print(f"metering: the proxy counted {counted_queries(env['DYNABASE_REDIS_URL'], 'bench/bench-main')} "
                      f"queries for the tenant; pgbench completed {through_proxy} transactions through it in {runs} "
                      f"runs, + 2 set-up queries each = {through_proxy + 2 * runs}", flush=True)

            if args.skip_limiter:
                return
            ldb, lpw = "bench_limited", passwords["bench_limited"]
            script = logs / "select1.sql"
            script.write_text("SELECT 1;\n")
            print("\n== limiter: tenant limited to 200 q/s (+burst 200), offered ~10x for 10 s", flush=True)
            admitted = offer_limited([(proxy_port, metrics)], ldb, lpw, script, clients=12)
            more = [(free_port(), free_port()) for _ in range(2)]
            proxies += [start_proxy(env, p, m, f"bench-{i + 1}") for i, (p, m) in enumerate(more)]
            time.sleep(2.5)  # the replica count (3) is published and the shared bucket is full again
            admitted += offer_limited([(proxy_port, metrics), *more], ldb, lpw, script, clients=4)

            time.sleep(2.5)  # a flush or two
            counted = counted_queries(env["DYNABASE_REDIS_URL"], "bench/bench-limited")
            print(f"\n== metering: proxies counted {counted} queries for the limited tenant; "
                  f"pgbench completed {admitted} transactions (+ its own connection checks)", flush=True)
            proxy_path.report(proxy_path.measure())
        finally:
            for proc in [*proxies, haproxy]:
                proc.terminate()
                proc.wait(timeout=10)
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
