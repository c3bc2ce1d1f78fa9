"""How well proxy-metered usage predicts each tenant's real Postgres CPU.

    python -m bench.attribution [--seconds 15] [--write-model model.json]

Four tenants run different workloads through the real proxy (pgbench clients ->
proxy -> PgBouncer -> Postgres): cheap point selects, heavy aggregations, a mix,
and single-row updates, each at a fixed rate (pgbench -R). The proxy meters queries and query time into Redis;
``BackendCpuSampler`` measures each tenant database's backends from /proc.
Calibration run (two phases at different concurrency): the model's coefficients
are fitted on the (usage, measured CPU) pairs and per-tenant factors taken.
Evaluation run (another mix of concurrency): estimated vs measured CPU per tenant.

Parallel query is switched off in the tenant databases: parallel workers live
for one query, usually between two sweeps, so their CPU would go unmeasured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis

from bench.common import devstack, proxy_engine
from bench.proxy import start_proxy
from dynabase.desired.cost import CostModel, UsageTotals, estimate, fit_cpu, tenant_factors, usage_by_tenant
from dynabase.desired.mongo import rollup
from dynabase.desired.sql import quote_ident
from dynabase.devstack.stack import free_port
from dynabase.engine.runtime import close_engine
from dynabase.keyspace import USAGE_PATTERN, decode_usage, usage_hour
from dynabase.spec import TenantDatabase, TierPolicy
from dynabase.usage.report import model_document
from dynabase.usage.sampler import BackendCpuSampler

POLICY = TierPolicy.model_validate({
    "apiVersion": "dynabase.io/v1alpha1", "kind": "TierPolicy", "metadata": {"name": "attribution"},
    "spec": {"tiers": {"BENCH": {"rank": 0, "postgres": {"connectionLimit": 30},
                                 "pgbouncer": {"poolSize": 8, "poolMode": "transaction"},
                                 "proxy": {"maxConnections": 100}}}},
})
ROWS = 200_000
POINT = "\\set id random(1, {rows})\nSELECT v FROM items WHERE id = :id;\n"
AGGREGATE = "\\set k random(0, 6)\nSELECT count(*), avg(length(v)) FROM items WHERE id % 7 = :k;\n"
MIXED = ("\\set id random(1, {rows})\n\\set r random(1, 25)\n\\set k random(0, 6)\n\\if :r = 1\n"
         "SELECT count(*), max(v) FROM items WHERE id % 7 = :k;\n\\else\n"
         "SELECT v FROM items WHERE id = :id;\n\\endif\n")
UPDATE = "\\set id random(1, {rows})\nUPDATE items SET v = md5(random()::text) WHERE id = :id;\n"
# database -> (script, transactions/s in calibration phase 1, phase 2, evaluation). Rates, not
# saturation: a database host is not run at 100 % CPU, and on a saturated host query wall
# time is mostly waiting for a core, which no per-tenant model can tell from work.
WORKLOADS = {
    "attr_points": (POINT, (1500, 600, 1000)),
    "attr_aggregates": (AGGREGATE, (8, 20, 12)),
    "attr_mixed": (MIXED, (150, 400, 250)),
    "attr_updates": (UPDATE, (300, 800, 500)),
}
CLIENTS = 2


@dataclass
class Run:
    usage: dict[str, UsageTotals]  # by database
    cpu: dict[str, float]  # measured vCPU-seconds by database


def tenant(db: str) -> TenantDatabase:
    return TenantDatabase.model_validate({
        "apiVersion": "dynabase.io/v1alpha1", "kind": "TenantDatabase",
        "metadata": {"name": db.replace("_", "-"), "namespace": "bench"},
        "spec": {"orgId": "bench", "tier": "BENCH", "tierPolicyRef": "attribution", "databaseName": db},
    })


async def setup(env: dict[str, str]) -> dict[str, str]:
    engine, secrets = await proxy_engine(env)
    tenants = [tenant(db) for db in WORKLOADS]
    result = await engine.reconcile_all({"attribution": POLICY}, tenants, complete=True)
    assert all(t.ready for t in result.tenants), [t.outcomes for t in result.tenants]
    await close_engine(engine)
    passwords = {t.database_name: secrets.passwords[t.key] for t in tenants}
    admin = await asyncpg.connect(env["DYNABASE_POSTGRES_DSN"])
    for db, password in passwords.items():
        await admin.execute(f"ALTER DATABASE {quote_ident(db)} SET max_parallel_workers_per_gather = 0")
        conn = await asyncpg.connect(host="127.0.0.1", port=int(env["PGPORT"]), user=db, password=password,
                                     database=db)
        await conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, $1::int) g", ROWS)
        await conn.execute("ANALYZE items")
        await conn.close()
    await admin.close()
    return passwords


def pgbench_at_rate(port: int, db: str, password: str, script: Path, rate: int, seconds: int) -> None:
    args = ["pgbench", "-n", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", str(seconds), "-R", str(rate),
            "-M", "extended", "-f", str(script), "-h", "127.0.0.1", "-p", str(port), "-U", db, db]
    out = subprocess.run(args, env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench {db} failed: {out.stderr}")


def metered(redis_url: str) -> dict[str, UsageTotals]:
    """The proxies' counters summed over all hours, by database (tenant key bench/<db with ->)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    docs = []
    for key in client.scan_iter(USAGE_PATTERN):
        docs += rollup(usage_hour(key), decode_usage(client.hgetall(key))).values()
    by_tenant = usage_by_tenant(docs)
    return {db: by_tenant.get(tenant(db).key, (UsageTotals(), None))[0] for db in WORKLOADS}


def minus(after: UsageTotals, before: UsageTotals) -> UsageTotals:
    return UsageTotals(after.queries - before.queries, after.query_seconds - before.query_seconds,
                       after.connections - before.connections)


async def run_phase(env: dict[str, str], port: int, passwords: dict[str, str], scripts: dict[str, Path],
                    phase: int, seconds: int) -> Run:
    before = metered(env["DYNABASE_REDIS_URL"])
    sampler = BackendCpuSampler(env["DYNABASE_POSTGRES_DSN"])
    await sampler.start()
    stop = asyncio.Event()
    sweeping = asyncio.create_task(sampler.run(stop, interval=0.5))
    loop = asyncio.get_running_loop()
    runs = [loop.run_in_executor(None, pgbench_at_rate, port, db, passwords[db], scripts[db], rates[phase],
                                 seconds)
            for db, (_, rates) in WORKLOADS.items()]
    await asyncio.gather(*runs)
    await asyncio.sleep(2.5)  # the proxy's last flush; backends idle meanwhile
    stop.set()
    await sweeping
    await sampler.close()
    after = metered(env["DYNABASE_REDIS_URL"])
    return Run({db: minus(after[db], before[db]) for db in WORKLOADS},
               {db: sampler.seconds_by_database.get(db, 0.0) for db in WORKLOADS})


def error_percent(estimated: float, measured: float) -> float:
    return (estimated - measured) / measured * 100 if measured > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15, help="per phase")
    parser.add_argument("--write-model", help="write the fitted coefficients and tenant factors here (JSON)")
    args = parser.parse_args()
    with devstack(["postgres", "redis", "pgbouncer"]) as env:
        passwords = asyncio.run(setup(env))
        workdir = Path(tempfile.mkdtemp(prefix="dynabase-bench-attribution-"))
        scripts = {}
        for db, (script, _) in WORKLOADS.items():
            scripts[db] = workdir / f"{db}.sql"
            scripts[db].write_text(script.format(rows=ROWS))
        port, metrics = free_port(), free_port()
        proxy = start_proxy(env, port, metrics, "attribution-0")
        try:
            # Warm-up: caches, plans and pool connections, not measured.
            asyncio.run(run_phase(env, port, passwords, scripts, 0, 3))
            calibration = [asyncio.run(run_phase(env, port, passwords, scripts, p, args.seconds)) for p in (0, 1)]
            evaluation = asyncio.run(run_phase(env, port, passwords, scripts, 2, args.seconds))
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
            subprocess.run(["rm", "-rf", str(workdir)], check=False)

    pairs = [(run.usage[db], run.cpu[db]) for run in calibration for db in WORKLOADS]
    model = fit_cpu(pairs, CostModel())
    calibration_totals = {db: (calibration[0].usage[db] + calibration[1].usage[db],
                               calibration[0].cpu[db] + calibration[1].cpu[db]) for db in WORKLOADS}
    factors = tenant_factors(calibration_totals, model)
    print(f"fitted on {len(pairs)} (usage, measured CPU) pairs from the calibration run: "
          f"cpu_seconds = {model.cpu_per_query_second:.4f} * query_seconds + {model.cpu_per_query:.7f} * queries",
          flush=True)
    print("\n== calibration run (in-sample)")
    header = (f"{'tenant':<17}{'queries':>9}{'query s':>9}{'measured':>10}{'model':>9}{'err %':>8}"
              f"{'+factor':>9}{'err %':>8}{'factor':>8}")
    for label, run in (("calibration", None), ("evaluation", evaluation)):
        if run is None:
            usage = {db: calibration_totals[db][0] for db in WORKLOADS}
            cpu = {db: calibration_totals[db][1] for db in WORKLOADS}
        else:
            print(f"\n== {label} run (out of sample, other concurrency)")
            usage, cpu = run.usage, run.cpu
        print(header)
        total_est = total_factored = total_measured = 0.0
        worst = worst_factored = 0.0
        for db in WORKLOADS:
            est = estimate(usage[db], model).cpu_seconds
            factored = estimate(usage[db], model, factors.get(db, 1.0)).cpu_seconds
            total_est, total_factored, total_measured = total_est + est, total_factored + factored, \
                total_measured + cpu[db]
            err, err_f = error_percent(est, cpu[db]), error_percent(factored, cpu[db])
            worst, worst_factored = max(worst, abs(err)), max(worst_factored, abs(err_f))
            print(f"{db:<17}{usage[db].queries:>9.0f}{usage[db].query_seconds:>9.1f}{cpu[db]:>10.2f}{est:>9.2f}"
                  f"{err:>+8.1f}{factored:>9.2f}{err_f:>+8.1f}{factors.get(db, 1.0):>8.3f}")
        print(f"{'all':<17}{'':>9}{'':>9}{total_measured:>10.2f}{total_est:>9.2f}"
              f"{error_percent(total_est, total_measured):>+8.1f}{total_factored:>9.2f}"
              f"{error_percent(total_factored, total_measured):>+8.1f}")
        print(f"ratio estimated/measured: model {total_est / total_measured:.3f}, with tenant factors "
              f"{total_factored / total_measured:.3f}; worst tenant |error| {worst:.1f}% (model), "
              f"{worst_factored:.1f}% (with factors); goal 10%", flush=True)
    if args.write_model:
        Path(args.write_model).write_text(json.dumps(model_document(model, {
            tenant(db).key: f for db, f in factors.items()}), indent=2))
        print(f"wrote {args.write_model}")
    print(f"(measured on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
