"""The offline engine, before vs after a change: start-up, offline 64 x (128 -> 128) and
batch-1 decode, each tree in its own process, interleaved over rounds (tokenmill/bench/ab.py).

    git worktree add /tmp/before <commit>
    python benchmarks/engine_core_ab.py /tmp/before . --rounds 3

Prints, per tree, the median, min and max of each figure, and after/before ratios of medians.
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm


def main() -> None:
    from tokenmill.bench.ab import add_workload_args

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("trees", nargs="+", help="checkouts to compare (the first is 'before')")
    add_workload_args(ap, rounds=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--model",
        default=None,
        help="an HF folder (default: the bundled model); a tiny one "
        "makes the per-step bookkeeping, not the model, the figure",
    )
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from tokenmill.bench.ab import emit, run_offline, spread, tree_commit
    from tokenmill.bench.offline import machine

    keys = ("num_prompts", "input_len", "output_len", "dtype", "model")
    child = {k: getattr(args, k) for k in keys}
    runs: dict[str, list[dict]] = {t: [] for t in args.trees}
    bar = tqdm(total=args.rounds * len(args.trees), desc="runs", unit="run")
    for r in range(args.rounds):
        order = args.trees if r % 2 == 0 else args.trees[::-1]
        for tree in order:
            runs[tree].append(run_offline(tree, child))
            bar.update(1)
    bar.close()
    keys = list(runs[args.trees[0]][0])  # the measured figures
    summary = {
        t: {"commit": tree_commit(t), **{k: spread([x[k] for x in rs]) for k in keys}}
        for t, rs in runs.items()
    }
    base = summary[args.trees[0]]
    ratios = {t: {k: s[k]["median"] / base[k]["median"] for k in keys} for t, s in summary.items()}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "workload": child,
              "rounds": args.rounds, "summary": summary, "ratio_to_first": ratios,
              "runs": runs}  # fmt: skip
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
