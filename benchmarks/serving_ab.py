"""The server, before vs after a change: `tokenmill serve` at saturation next to the offline
engine of the same tree, and TTFT at a steady 2 requests/s, one server at a time, interleaved.

    python benchmarks/serving_ab.py /tmp/before . ".:--no-engine-process" --rounds 2

A variant is TREE or TREE:EXTRA SERVE ARGS. Saturation: num_prompts requests in flight at once
(as offline has them), streaming over loopback, after a warm-up with other prompts of the same
shape. TTFT: rate_prompts chat-sized requests (128 -> 32) arriving as a Poisson process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from tqdm.auto import tqdm


def serve(tree: str, extra: list[str], port: int) -> subprocess.Popen:
    from tokenmill.bench.ab import tree_env

    usage_db = os.path.join(tempfile.mkdtemp(), "usage.sqlite")
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
           "--max-model-len", "1024", "--dtype", "float32", "--usage-db", usage_db, *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, env=tree_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def measure_server(tree: str, extra: list[str], args) -> dict:
    from tokenmill.bench.metrics import report
    from tokenmill.bench.offline import Workload
    from tokenmill.bench.serve import Sample, run_load, wait_ready

    work = Workload(args.num_prompts, args.input_len, args.output_len)
    samples = [Sample(p, work.output_len) for p in work.prompts(49152)]
    warm = Workload(args.num_prompts, args.input_len, args.output_len, seed=1).prompts(49152)
    paced = Workload(args.rate_prompts, args.input_len, 32, seed=2).prompts(49152)
    server = serve(tree, extra, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        started = time.monotonic()
        wait_ready(url, 180, alive=lambda: server.poll() is None)
        ready_s = time.monotonic() - started
        warm_samples = [Sample(p, work.output_len) for p in warm]
        asyncio.run(run_load(url, warm_samples, max_concurrency=len(warm), progress=False))
        records, duration = asyncio.run(
            run_load(url, samples, max_concurrency=len(samples), progress=False)
        )
        saturated = report(records, duration)
        records, duration = asyncio.run(
            run_load(url, [Sample(p, 32) for p in paced], request_rate=args.rate, progress=False)
        )
        steady = report(records, duration)
    finally:
        server.terminate()
        server.wait(60)
    return {
        "ready_s": ready_s,
        "server_output_tokens_per_s": saturated["output_throughput"],
        "failed": saturated["failed"] + steady["failed"],
        "ttft_p50_ms_at_rate": steady["ttft_ms"]["median"],
        "ttft_p99_ms_at_rate": steady["ttft_ms"]["p99"],
    }


def main() -> None:
    from tokenmill.bench.ab import add_workload_args

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("variants", nargs="+", help="TREE or TREE:EXTRA ARGS (the first is 'before')")
    add_workload_args(ap, rounds=2)
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s of the TTFT run")
    ap.add_argument("--rate-prompts", type=int, default=40)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from tokenmill.bench.ab import emit, run_offline, spread, tree_commit
    from tokenmill.bench.offline import machine

    variants = [(v.split(":", 1) + [""])[:2] for v in args.variants]
    trees = sorted({t for t, _ in variants}, key=[t for t, _ in variants].index)
    child = {"num_prompts": args.num_prompts, "input_len": args.input_len,
             "output_len": args.output_len, "dtype": "float32"}  # fmt: skip
    served: dict[str, list[dict]] = {v: [] for v in args.variants}
    offline: dict[str, list[float]] = {t: [] for t in trees}
    bar = tqdm(total=args.rounds * (len(variants) + len(trees)), desc="runs", unit="run")
    for r in range(args.rounds):
        order = list(zip(args.variants, variants))
        for name, (tree, extra) in order if r % 2 == 0 else order[::-1]:
            served[name].append(measure_server(tree, extra.split(), args))
            bar.update(1)
        for tree in trees:
            offline[tree].append(run_offline(tree, child)["offline_tokens_per_s"])
            bar.update(1)
    bar.close()
    summary = {}
    for name, (tree, _) in zip(args.variants, variants):
        keys = list(served[name][0])
        row = {k: spread([x[k] for x in served[name]]) for k in keys}
        row["offline_tokens_per_s"] = spread(offline[tree])
        ratios = [s["server_output_tokens_per_s"] / o for s, o in zip(served[name], offline[tree])]
        row["server_over_offline"] = spread(ratios)
        summary[name] = {"commit": tree_commit(tree), **row}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "workload": child, "rate": args.rate, "summary": summary,
              "runs": {"served": served, "offline": offline}}  # fmt: skip
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
