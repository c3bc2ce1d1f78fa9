"""Faults, measured: each with traffic through a real proxy and PgBouncer and a tier change in flight.

    python -m bench.faults --tenants 8 --outage 6

A real `dynabase operator` runs against the devstack's apiserver (drift interval
--drift seconds), a `dynabase proxy` in front of the devstack's PgBouncer agent,
and a fake Railway (tests/railway/fake.py) serves the tenants that declare a
Railway service. Two more tenants are over their included usage and restricted
(one to a lower QPS, one to read-only); their usage is written by a "seed" replica
that rewrites its absolute counters every second, as a live proxy does.

For each fault: the traffic tenants' tier is flipped (SMALL <-> BIG), the fault is
injected at once, the restricted tenants are touched (an annotation) so that a pass
judges them while it lasts, the fault is undone after --outage seconds, and then:
- converge: seconds from the tier change until every tenant is Ready on its tier;
- lifted: samples (every ~0.3 s) in which a restriction was not in force: the
  read-only role without default_transaction_read_only, the QPS-restricted tenant's
  published limit above its restricted QPS, or a status without its restriction;
- lost: queries the clients saw succeed that are missing from the proxy's usage hash;
- errors: what the clients saw, by SQLSTATE or exception.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.railway.fake import FakeRailway, fake_in_thread

from bench.common import ROOT
from bench.fault_probes import NAMESPACE, RESTRICTED_QPS, Probes, Tenant
from bench.proxy import start_proxy
from dynabase.devstack.stack import Devstack, free_port

POLICY = f"""apiVersion: dynabase.io/v1alpha1
kind: TierPolicy
metadata: {{name: faults}}
spec:
  tiers:
    SMALL: {{rank: 0, postgres: {{connectionLimit: 6}}, pgbouncer: {{poolSize: 2}},
            proxy: {{maxConnections: 6, qps: 500}}, railway: {{replicas: 1, vCPUs: 0.5, memoryGB: 0.5}},
            lifecycle: {{downgradeGracePeriod: 0s}}}}
    BIG: {{rank: 1, postgres: {{connectionLimit: 12}}, pgbouncer: {{poolSize: 4}},
          proxy: {{maxConnections: 12, qps: 1000}}, railway: {{replicas: 2, vCPUs: 1, memoryGB: 1}},
          lifecycle: {{downgradeGracePeriod: 0s}}}}
    TINY: {{rank: 2, proxy: {{qps: 50}},
           billing: {{includedVcpuHours: 0.001, softOveragePeriod: 1s, restrictedQps: {RESTRICTED_QPS}}}}}
    TINYRO: {{rank: 3, proxy: {{qps: 50}},
             billing: {{includedVcpuHours: 0.001, softOveragePeriod: 1s, overageRestriction: readOnly}}}}
"""


@dataclass
class Row:
    fault: str
    converge: float | None  # seconds from the tier change
    recovered: float | None  # seconds from the fault's end
    lifted: int
    lost: int
    extra: int
    errors: Counter[str]


class Bench:
    def __init__(self, stack: Devstack, fake: FakeRailway, tenants: list[Tenant], drift: float) -> None:
        self.stack, self.fake, self.tenants, self.drift = stack, fake, tenants, drift
        self.env = stack.env()
        self.workdir = Path(tempfile.mkdtemp(prefix="dynabase-faults-bench-"))
        self.operator: subprocess.Popen[bytes] | None = None
        self.probes = Probes(self.env, tenants, free_port(), "bench-proxy")

    # -- plumbing ---------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        out = subprocess.run([self.env["DYNABASE_KUBECTL"], *args], input=stdin, capture_output=True, text=True,
                             env={**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]}, timeout=60)
        if check and out.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
        return out.stdout if out.returncode == 0 else ""

    def start_operator(self) -> None:
        log = open(self.workdir / "operator.log", "ab")  # noqa: SIM115 - the child owns it
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "dynabase.cli", "operator", "--metrics-port", "0", "--liveness-port", "0",
             "--drift-interval", str(self.drift), "--namespace", NAMESPACE],
            env={**os.environ, **self.env, "DYNABASE_LOG_LEVEL": "WARNING", "DYNABASE_RAILWAY_TOKEN": self.fake.token,
                 "DYNABASE_RAILWAY_URL": self.fake.url},
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGKILL)
            self.operator.wait(10)

    def passwords_from_secrets(self) -> None:
        for t in self.tenants:
            data = json.loads(self.kubectl("get", "secret", "-n", NAMESPACE, f"{t.name}-dynabase-password",
                                           "-o", "json"))["data"]["password"]
            self.probes.passwords[t.key] = base64.b64decode(data).decode()

    # -- one fault ----------------------------------------------------------------------------

    async def run(self, name: str, inject: Callable[[], Awaitable[None]], undo: Callable[[], Awaitable[None]],
                  outage: float, restricted: tuple[Tenant, Tenant]) -> Row:
        stop = asyncio.Event()
        before_ok, before_metered = Counter(self.probes.traffic.ok), await asyncio.to_thread(self.probes.metered)
        errors_before = Counter(self.probes.traffic.errors)
        clients = [asyncio.create_task(self.probes.client(t, stop)) for t in self.tenants]
        await asyncio.sleep(1.0)  # traffic flowing before anything changes
        for t in self.tenants:
            if t.tier in ("SMALL", "BIG"):
                t.tier = "BIG" if t.tier == "SMALL" else "SMALL"
        started = time.monotonic()
        manifests = "---\n".join(t.manifest() for t in self.tenants)
        await asyncio.to_thread(self.kubectl, "apply", "-f", "-", stdin=manifests)
        await inject()
        # A pass over the restricted tenants while the fault lasts (an annotation is an update to kopf).
        await asyncio.to_thread(self.kubectl, "annotate", "tdb", "-n", NAMESPACE, restricted[0].name,
                                restricted[1].name, f"bench/fault={name.split()[0]}-{time.time():.0f}",
                                "--overwrite", check=False)
        lifted, converge, undone = 0, None, 0.0
        while time.monotonic() - started < 300:
            if not undone and time.monotonic() - started >= outage:
                await undo()
                undone = time.monotonic()
            statuses = await asyncio.to_thread(self.probes.statuses)
            lifted += await asyncio.to_thread(self.probes.restrictions, *restricted, statuses)
            if undone and self.probes.converged(statuses):
                converge = time.monotonic() - started
                break
            await asyncio.sleep(0.3)
        if not undone:
            await undo()
        if converge is None:
            self.probes.explain(await asyncio.to_thread(self.probes.statuses))
        await asyncio.sleep(1.0)  # traffic on the new tier
        stop.set()
        await asyncio.gather(*clients)
        metered = await self.probes.settled_metering()
        ok = self.probes.traffic.ok - before_ok
        counted = Counter({k: metered[k] - before_metered[k] for k in metered})
        lost = sum(max(0, ok[t.key] - counted[t.key]) for t in self.tenants)
        extra = sum(max(0, counted[t.key] - ok[t.key]) for t in self.tenants)
        recovered = None if converge is None else started + converge - undone
        row = Row(name, converge, recovered, lifted, lost, extra, self.probes.traffic.errors - errors_before)
        print(f"  {name}: converge {converge if converge is None else round(converge, 1)}s, lifted {lifted}, "
              f"lost {lost} (of {sum(ok.values())} ok), errors {dict(row.errors)}", flush=True)
        return row


def table(rows: list[Row]) -> str:
    lines = ["| fault | converge (s) | after the fault ended (s) | restrictions wrongly lifted | usage lost | "
             "extra metered | client errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = ", ".join(f"{k} x{v}" for k, v in r.errors.most_common()) or "none"
        converge = "did not converge" if r.converge is None else f"{r.converge:.1f}"
        recovered = "-" if r.recovered is None else f"{r.recovered:.1f}"
        lines.append(f"| {r.fault} | {converge} | {recovered} | {r.lifted} | {r.lost} | {r.extra} | "
                     f"{sum(r.errors.values())}: {errors} |")
    return "\n".join(lines)


@contextlib.contextmanager
def devstack() -> Iterator[Devstack]:
    root = Path(tempfile.mkdtemp(prefix="dynabase-faults-"))
    stack = Devstack(root)
    try:
        stack.up(["postgres", "redis", "pgbouncer", "etcd", "kube-apiserver"], build=False)
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


async def main_async(args: argparse.Namespace, stack: Devstack, fake: FakeRailway) -> list[Row]:
    traffic = [Tenant(f"f-{i:02d}", "SMALL", railway=i < 2) for i in range(args.tenants)]
    slow, read_only = Tenant("f-slow", "TINY"), Tenant("f-ro", "TINYRO")
    for t in traffic[:2]:
        fake.add_service("env", "proj", t.name)
    bench = Bench(stack, fake, [*traffic, slow, read_only], args.drift)
    bench.kubectl("apply", "-k", str(ROOT / "crds"))
    bench.kubectl("wait", "--for=condition=Established", "crd/tenantdatabases.dynabase.io", "--timeout=60s")
    bench.kubectl("create", "namespace", NAMESPACE)
    bench.kubectl("apply", "-f", "-", stdin=POLICY)
    seeding = asyncio.Event()
    seeder = asyncio.create_task(bench.probes.seed_usage(seeding, [slow, read_only]))
    proxy = start_proxy(bench.env, bench.probes.proxy_port, free_port(), bench.probes.replica)
    bench.start_operator()
    try:
        bench.kubectl("apply", "-f", "-", stdin="---\n".join(t.manifest() for t in bench.tenants))
        started = time.monotonic()
        while not bench.probes.converged(await asyncio.to_thread(bench.probes.statuses)) or \
                bench.probes.restrictions(slow, read_only, await asyncio.to_thread(bench.probes.statuses)):
            if time.monotonic() - started > 180:
                raise SystemExit(f"not converged and restricted after 180s; see {bench.workdir}/operator.log")
            await asyncio.sleep(0.5)
        print(f"{len(bench.tenants)} tenants Ready, 2 restricted, after {time.monotonic() - started:.1f}s", flush=True)
        bench.passwords_from_secrets()
        outage = args.outage

        async def nothing() -> None:
            return None

        def restart(service: str, kill: bool) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
            async def down() -> None:
                await asyncio.to_thread(stack.stop, service, kill=kill)

            async def up() -> None:
                await asyncio.to_thread(stack.start, service)
            return down, up

        async def kill_agent() -> None:
            os.kill(stack.state.services["pgbouncer"].pid, signal.SIGKILL)  # its PgBouncers live on

        async def kill_operator() -> None:
            await asyncio.sleep(0.2)  # the batch window: the pass has begun
            bench.kill_operator()

        async def start_operator() -> None:
            bench.start_operator()

        async def railway_failing() -> None:
            fake.fail_next(429, times=3, retry_after=1)
            fake.fail_next(500, times=40)

        async def railway_back() -> None:
            fake.failures.clear()

        faults: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
            ("none (baseline)", nothing, nothing),
            ("Redis killed and restarted (empty)", *restart("redis", True)),
            ("Postgres restarted", *restart("postgres", False)),
            ("PgBouncer agent killed", kill_agent, restart("pgbouncer", False)[1]),
            ("operator killed mid-pass", kill_operator, start_operator),
            ("apiserver restarted", *restart("kube-apiserver", False)),
            ("Railway 429 then 500", railway_failing, railway_back),
        ]
        rows = []
        for name, inject, undo in faults:
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            rows.append(await bench.run(name, inject, undo, outage, (slow, read_only)))
        return rows
    finally:
        seeding.set()
        await seeder
        bench.kill_operator()
        proxy.terminate()
        proxy.wait(10)
        print(f"operator log: {bench.workdir}/operator.log", flush=True)
        if args.keep_logs:
            shutil.copytree(stack.root / "logs", bench.workdir / "devstack-logs", dirs_exist_ok=True)
            for log in (stack.root / "pgbouncer").glob("*.log"):
                shutil.copy(log, bench.workdir / "devstack-logs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=8, help="tenants with traffic and a tier change")
    parser.add_argument("--outage", type=float, default=6.0, help="seconds each fault lasts")
    parser.add_argument("--drift", type=float, default=5.0, help="the operator's drift interval (seconds)")
    parser.add_argument("--only", help="run only the faults whose name contains one of these (comma separated)")
    parser.add_argument("--keep-logs", action="store_true", help="copy the servers' logs beside the operator's")
    args = parser.parse_args()
    with devstack() as stack, fake_in_thread(FakeRailway("bench-railway-token")) as fake:
        rows = asyncio.run(main_async(args, stack, fake))
    print(f"\nFaults ({args.tenants} tenants with traffic through the proxy and a tier change in flight, "
          f"2 restricted; outage {args.outage:g}s; operator drift interval {args.drift:g}s)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
