"""What every peer driver shares: the workload file, timing, the result file.

A driver runs in its engine's own venv: `python drivers/<engine>.py --model M --workload W.json
--out R.json [--variant V]`. The workload holds token ids, so every engine sees the same tokens:
{"offline": [[ids], ...], "output_len": n, "latency": [[ids], ...], "latency_output_len": n}.
Each driver writes {"engine", "variant", "version", "startup_s", "offline_output_tps",
"decode_b1_tps", "ttft_b1_s"} (medians over the latency prompts). Greedy, EOS ignored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def load_workload(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def latency_by_timing(run: Callable[[list, int], object], prompts: list, n: int) -> list:
    """(TTFT, decode tokens/s) per prompt from the time of 1 token and of n tokens, for engines
    that report no per-request timings (the prompt must not be cached between the two runs)."""
    out = []
    for p in prompts:
        _, t1 = timed(lambda p=p: run([p], 1))
        _, tn = timed(lambda p=p: run([p], n))
        out.append((t1, (n - 1) / (tn - t1)))
    return out


def write(
    args,
    engine: str,
    version: str,
    startup_s: float,
    offline_tokens: int,
    offline_s: float,
    latency: list[tuple[float, float]],
) -> None:
    """latency: per prompt (ttft_s, decode tokens/s)."""
    result = {
        "engine": engine,
        "variant": args.variant,
        "version": version,
        "startup_s": startup_s,
        "offline_output_tps": offline_tokens / offline_s,
        "ttft_b1_s": statistics.median(t for t, _ in latency),
        "decode_b1_tps": statistics.median(d for _, d in latency),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
