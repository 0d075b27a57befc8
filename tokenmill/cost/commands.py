"""`tokenmill tco report | plan`, and the usage flags of `tokenmill serve`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path


def add_usage_options(p: argparse.ArgumentParser) -> None:
    from tokenmill.serve.usage import DEFAULT_DB

    g = p.add_argument_group("usage and cost accounting")
    g.add_argument(
        "--usage-db", default=str(DEFAULT_DB), help="SQLite file keeping usage across restarts"
    )
    g.add_argument("--no-usage", action="store_true", help="no accounting, no power sampling")
    g.add_argument(
        "--hardware",
        default="auto",
        help="hardware catalogue entry for TCO (h100-sxm, h200-sxm, b200, l40s, cpu-2core, or "
        "one from --catalog); auto: by CUDA device name, else cpu-2core",
    )
    g.add_argument("--catalog", default=None, help="TOML overriding the shipped catalogue")
    g.add_argument("--power-interval", type=float, default=1.0, help="power sampling period, s")
    g.add_argument(
        "--instance-name",
        default=None,
        help="instance label (default: the host name; name each server sharing a --usage-db)",
    )


def usage_options(args: argparse.Namespace):
    from tokenmill.serve.usage import UsageOptions

    if args.no_usage:
        return None
    return UsageOptions(
        Path(args.usage_db),
        args.hardware,
        Path(args.catalog) if args.catalog else None,
        args.power_interval,
        args.instance_name,
    )


def add_parsers(sub) -> None:
    from tokenmill.serve.usage import DEFAULT_DB

    t = sub.add_parser("tco", help="cost of tokens").add_subparsers(dest="tco", required=True)
    r = t.add_parser(
        "report",
        help="usage, energy and cost from a server's usage file",
        description="Tokens, energy and TCO per model, instance and tenant, from the SQLite file "
        "that `tokenmill serve` keeps (--usage-db).",
    )
    r.add_argument("--db", default=str(DEFAULT_DB))
    r.add_argument("--since", default=None, help="24h, 7d, or a date (2026-11-01)")
    r.add_argument("--catalog", default=None, help="TOML overriding the shipped catalogue")
    r.add_argument("--json", action="store_true")
    p = t.add_parser(
        "plan",
        help="compare hardware/precision options by cost per million tokens",
        description="Given measured throughput profiles (tokenmill bench JSON) and a demand, "
        "the cost of serving it on each option, cheapest first, with a plot.",
    )
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        help="FILE:HARDWARE[:LABEL], FILE from tokenmill bench serve|offline|latency --json-out",
    )
    p.add_argument("--tokens-per-day", type=float, required=True)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--catalog", default=None)
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    p.add_argument("--json", action="store_true")


def since_hour(text: str | None, now: float | None = None) -> int:
    if not text:
        return 0
    now = time.time() if now is None else now
    units = {"h": 3600, "d": 86400}
    if text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return int((now - float(text[:-1]) * units[text[-1]]) // 3600)
    try:
        return int(datetime.fromisoformat(text).timestamp() // 3600)
    except ValueError:
        raise ValueError(f"--since {text!r}: use 24h, 7d or a date like 2026-11-01") from None


def run(args: argparse.Namespace) -> int:
    from tokenmill.cost.tco import load_catalog

    catalog, prices = load_catalog(args.catalog)
    result = report(args, catalog, prices) if args.tco == "report" else plan(args, catalog, prices)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


def report(args, catalog, prices) -> dict:
    from tokenmill.cost.accounting import UsageStore
    from tokenmill.cost.report import usage_report

    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db} does not exist; serve with --usage-db to create it")
    store = UsageStore(args.db)
    hour = since_hour(args.since)
    result = usage_report(store.usage(hour), store.uptime(hour), catalog, prices)
    store.close()
    if not args.json:
        print(
            f"{'model':24} {'instance':18} {'tenant':14} {'tokens':>10} {'J/token':>9} "
            f"{'USD':>10} {'USD/Mtok':>9}  energy"
        )
        for t in result["tenants"]:
            tokens = t["prompt_tokens"] + t["completion_tokens"]
            print(
                f"{t['model'][:24]:24} {t['instance'][:18]:18} {t['tenant'][:14]:14} "
                f"{tokens:>10} {_num(t['joules_per_token'], 4):>9} {_num(t['cost_usd'], 6):>10} "
                f"{_num(t['cost_per_million_tokens'], 3):>9}  {t['energy_source']}"
            )
        print(f"\n{'model':24} {'instance':18} {'hardware':14} {'hours':>8} {'share':>6} "
              f"{'USD':>10} {'USD/Mtok':>9}")  # fmt: skip
        for i in result["instances"]:  # each instance pays its slice's share of the device
            share = i["device_share"]
            print(
                f"{i['model'][:24]:24} {i['instance'][:18]:18} {i['hardware'][:14]:14} "
                f"{i['uptime_hours']:>8.3f} {_num(share, 3):>6} {_num(i['cost_usd'], 6):>10} "
                f"{_num(i['cost_per_million_tokens'], 3):>9}"
            )
        total = result["total"]
        print(
            f"total: {total['tokens']} tokens, {total['energy_joules']:.1f} J, "
            f"{total['cost_usd']:.6f} USD, {_num(total['cost_per_million_tokens'], 3)} USD/Mtok"
        )
    return result


def plan(args, catalog, prices) -> list[dict]:
    from tokenmill.cost.plan import plan as make_plan
    from tokenmill.cost.plan import read_profile

    profiles = [read_profile(p) for p in args.profile]
    rows = make_plan(
        profiles, catalog, prices, args.tokens_per_day, args.slo_ttft_ms, args.slo_tpot_ms
    )
    if not args.json:
        for r in rows:
            slo = "" if r["meets_slo"] else f"  misses SLO: {', '.join(r['misses'])}"
            print(
                f"{r['option']:24} {r['hardware']:10} {r['instances']:>4} x  "
                f"{r['usd_per_million_tokens']:10.4f} USD/Mtok  {r['usd_per_day']:10.2f} USD/day"
                f"  energy {r['energy_source']}{slo}"
            )
    if args.plot:
        plot_plan(rows, args.plot, args.tokens_per_day)
        print(f"plot: {args.plot}")
    return rows


def plot_plan(rows: list[dict], path: str, tokens_per_day: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    labels = [f"{r['option']} ({r['hardware']} x{r['instances']})" for r in rows]
    colors = ["tab:blue" if r["meets_slo"] else "tab:gray" for r in rows]
    ax.barh(labels[::-1], [r["usd_per_million_tokens"] for r in rows][::-1], color=colors[::-1])
    ax.set_xlabel("USD per million tokens (TCO)")
    ax.set_title(f"Serving {tokens_per_day:,.0f} tokens/day (gray: misses an SLO)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
