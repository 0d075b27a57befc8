"""Where the offline workload's time goes, over whole runs: tokenmill alone on the workload of
offline_throughput.py (64 x 128 -> 128, greedy, EOS ignored), wall time per model part
(tokenmill/bench/breakdown.py's timers, over prefill and decode steps alike) and prefill vs
decode steps. It gives the GEMMs' share of a run, which bounds what removing everything else
could gain.

    python benchmarks/offline_breakdown.py [--model DIR] [--repeats 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="an HF folder (default: the bundled model)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from tokenmill import LLM
    from tokenmill.bench.breakdown import timed_parts
    from tokenmill.bench.offline import Workload, commit, machine, run_tokenmill

    llm = LLM(args.model or "default", dtype=args.dtype, max_model_len=1024)
    engine, vocab = llm.engine, llm.engine.loaded.arch.vocab_size
    steps: list[tuple[float, bool]] = []  # (seconds, had prefill tokens)
    step = engine.step

    def timed_step():
        prefilling = any(r.num_output_tokens == 0 for r in engine.scheduler.waiting) or any(
            r.num_output_tokens == 0 for r in engine.scheduler.running
        )
        t = time.perf_counter()
        out = step()
        steps.append((time.perf_counter() - t, prefilling))
        return out

    engine.step = timed_step
    n, i, o = args.num_prompts, args.input_len, args.output_len
    run_tokenmill(llm, Workload(n, i, o, seed=1).prompts(vocab), o)  # warm-up, other prompts
    print(f"{machine()}, commit {commit()}, {time.strftime('%Y-%m-%d')}, {args.dtype}")
    for rep in range(args.repeats):
        steps.clear()
        parts: Counter = Counter()
        with timed_parts(parts):
            t0 = time.perf_counter()
            r = run_tokenmill(llm, Workload(n, i, o, seed=100 + rep).prompts(vocab), o)
            wall = time.perf_counter() - t0
        prefill = [s for s, p in steps if p]
        decode = [s for s, p in steps if not p]
        print(
            f"run {rep}: {r.output_tokens_per_s:.1f} output tok/s, {wall:.2f} s: "
            f"{len(prefill)} prefill steps {sum(prefill):.2f} s, {len(decode)} decode steps "
            f"{sum(decode):.2f} s (median {1e3 * statistics.median(decode):.1f} ms)"
        )
        for label, sec in parts.most_common():
            print(f"  {label:28s} {sec:6.2f} s  {100 * sec / wall:5.1f}%")
        rest = wall - sum(parts.values())
        print(
            f"  {'rest (prefill attention, engine)':28s} {rest:6.2f} s  {100 * rest / wall:5.1f}%"
        )


if __name__ == "__main__":
    main()
