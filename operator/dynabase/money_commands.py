"""`dynabase usage report` and `dynabase billing close`: the month's usage priced, and sent to Stripe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dynabase.options import EXIT_INVALID, EXIT_OK
from dynabase.settings import env_str


def add_money_commands(sub: Any) -> None:
    usage = sub.add_parser("usage", help="metered usage, revenue and cost per tenant")
    usage_actions = usage.add_subparsers(dest="usage_action", required=True)
    report = usage_actions.add_parser(
        "report", help="a month per tenant and tier: vCPU-hours, included/overage, fees, cost, gross margin "
                       "(usage from $DYNABASE_MONGO_URL's tenantUsage, else $DYNABASE_REDIS_URL)")
    report.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    report.add_argument("--manifests", nargs="+", required=True, help="TierPolicy/TenantDatabase files or folders")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.add_argument("--bill", help="the month's bill figures, YAML/JSON {YYYY-MM: {cpuVcpuSeconds, "
                                       "memoryGbSeconds, costUSD[, cpuCostUSD]}}; without it no cost or margin")
    report.add_argument("--bill-railway", metavar="PROJECT/SERVICE_ID",
                        help="take the bill from Railway's usage query for the database service "
                             "(token from DYNABASE_RAILWAY_TOKEN or DYNABASE_RAILWAY_PROJECT_TOKEN)")
    report.add_argument("--kube-event", action="store_true",
                        help="also post a calibration alert as a Kubernetes Event on the TierPolicy")
    report.add_argument("--model", help="cost-model coefficients and tenantFactors (YAML/JSON) instead of the "
                                        "version stored in $DYNABASE_POSTGRES_DSN (default: that version, else "
                                        "the built-in model)")
    report.add_argument("--write-model", action="store_true",
                        help="store a new cost-model version in Postgres for the engine, reports and billing: "
                             "the --model file, calibrated to the bill when one is given")
    report.add_argument("--metrics-file", help="write the usage metrics here (Prometheus textfile format)")
    report.set_defaults(func=_cmd_usage)

    _billing_parser(sub)


def _cmd_usage(args: argparse.Namespace) -> int:
    import asyncio

    from dynabase.usage.bill import BillUnavailable
    from dynabase.usage.report import run_report

    try:
        text, messages = asyncio.run(run_report(
            args.month, args.manifests, output_format=args.format,
            bill_path=Path(args.bill) if args.bill else None, model_path=Path(args.model) if args.model else None,
            metrics_file=Path(args.metrics_file) if args.metrics_file else None,
            mongo_url=env_str("DYNABASE_MONGO_URL"), redis_url=env_str("DYNABASE_REDIS_URL"),
            postgres_dsn=env_str("DYNABASE_POSTGRES_DSN"), railway_service=args.bill_railway,
            kube_event=args.kube_event, write_model=args.write_model,
        ))
    except (ValueError, OSError, BillUnavailable) as exc:
        print(f"usage report: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(text)
    for message in messages:
        print(message, file=sys.stderr)
    return EXIT_OK


def _cmd_billing_close(args: argparse.Namespace) -> int:
    import asyncio
    import datetime as dt
    import os

    import psycopg

    from dynabase.billing.close import StripeSettings, needs_attention, render, run_close
    from dynabase.billing.close_ledger import CloseBusy
    from dynabase.billing.config import API_KEY_ENV, ConfigError, load_api_key
    from dynabase.desired.charges import previous_month
    from dynabase.kubeapi import KubeApiError
    from dynabase.usage.month import load_declared, load_declared_from_kube, open_month_reader

    month = args.month or previous_month(dt.datetime.now(dt.UTC))
    try:
        key = load_api_key(os.environ)
    except ConfigError as exc:
        print(f"billing close: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if key is None and not args.dry_run:
        print(f"billing close: set {API_KEY_ENV} (or {API_KEY_ENV}_FILE) to a Stripe secret or restricted key "
              "that may write invoice items", file=sys.stderr)
        return EXIT_INVALID
    if bool(args.manifests) == args.kube:
        print("billing close: give the tenants with --manifests PATH… or --kube (read from the cluster)",
              file=sys.stderr)
        return EXIT_INVALID
    stripe = StripeSettings(key, args.stripe_api_base) if key is not None else None

    async def run() -> Any:
        declared = load_declared(args.manifests) if args.manifests else await load_declared_from_kube(args.namespace)
        async with open_month_reader(postgres_dsn=args.postgres_dsn, mongo_url=env_str("DYNABASE_MONGO_URL"),
                                     redis_url=env_str("DYNABASE_REDIS_URL")) as reader:
            return await run_close(month, lambda: reader.price(month, *declared), args.postgres_dsn, stripe,
                                   preview=args.dry_run)

    try:
        result = asyncio.run(run())
    except (ValueError, OSError, CloseBusy, psycopg.Error, KubeApiError) as exc:
        print(f"billing close: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(render(result, args.format))
    for noted in needs_attention(result):
        print(f"{noted.tenant}: {noted.outcome.value}: {noted.detail}", file=sys.stderr)
    return EXIT_OK if result.closed or args.dry_run else EXIT_INVALID


def _billing_parser(sub: Any) -> None:
    from dynabase.options import Command
    from dynabase.settings import parse_list

    billing = sub.add_parser("billing", help="month-end billing to Stripe")
    actions = billing.add_subparsers(dest="billing_action", required=True)
    close = Command(actions.add_parser(
        "close", help="send each tenant's overage of a month to Stripe as invoice items, exactly once (a ledger "
                      "in Postgres); usage from $DYNABASE_MONGO_URL's tenantUsage, else $DYNABASE_REDIS_URL; "
                      "the key from $DYNABASE_STRIPE_API_KEY"))
    close.parser.add_argument("--month", type=_month, help="YYYY-MM (UTC); default the previous month")
    close.parser.add_argument("--manifests", nargs="+", help="TierPolicy/TenantDatabase files or folders "
                                                             "(status history from Postgres)")
    close.parser.add_argument("--kube", action="store_true",
                              help="read TierPolicies and TenantDatabases (with status) from the cluster")
    close.option("--namespace", env="DYNABASE_NAMESPACES", parse=parse_list, action="append", default=[],
                 default_text="all", example="team-a,team-b", help="--kube: only these namespaces (repeat)")
    close.option("--postgres-dsn", env="DYNABASE_POSTGRES_DSN", required=True,
                 help="the ledger, the cost model, tenant status and the orgs' Stripe customers")
    close.option("--stripe-api-base", env="DYNABASE_STRIPE_API_BASE", default_text="https://api.stripe.com",
                 help="Stripe's API address (stripe-mock in tests)")
    close.parser.add_argument("--dry-run", action="store_true", help="show what would be sent; write nothing")
    close.parser.add_argument("--format", choices=["table", "json"], default="table")
    close.done(_cmd_billing_close)


def _month(text: str) -> str:
    from dynabase.desired.charges import month_bounds

    try:
        month_bounds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
