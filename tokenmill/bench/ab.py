"""A/B of code trees: the same measurement run in a subprocess per checkout (PYTHONPATH set to
it), interleaved round by round so that drift on a noisy machine falls on both sides. Used by
benchmarks/engine_core_ab.py and benchmarks/serving_ab.py."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Runs inside the tree under test; uses only the offline API every tree has.
OFFLINE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from tokenmill import LLM, SamplingParams
from tokenmill.bench.offline import Workload, run_tokenmill
a = json.loads(sys.argv[1])
t1 = time.perf_counter()
llm = LLM(model=a.get("model") or "default", dtype=a["dtype"], max_model_len=1024)
t2 = time.perf_counter()
work = Workload(a["num_prompts"], a["input_len"], a["output_len"])
prompts = work.prompts(llm.engine.loaded.arch.vocab_size)
first = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1), use_tqdm=False)
t3 = time.perf_counter()
warm = SamplingParams(max_tokens=a["output_len"], ignore_eos=True, temperature=0)
llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], warm, use_tqdm=False)
offline = run_tokenmill(llm, prompts, a["output_len"]).output_tokens_per_s
one = llm.generate([{"prompt_token_ids": prompts[1]}], warm, use_tqdm=False)[0]
print(json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
    "offline_tokens_per_s": offline, "batch1_tokens_per_s": 1.0 / one.metrics.tpot,
}))
"""


def add_workload_args(ap, rounds: int) -> None:
    """The flags every A/B and overhead script shares: rounds and the offline workload."""
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)


def emit(result: dict, json_out: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to `json_out` when given."""
    print(json.dumps(result, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


def tree_env(tree: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(tree).resolve())
    return env


def run_offline(tree: str, args: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD, json.dumps(args)],
        env=tree_env(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{tree}: offline run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_commit(tree: str) -> str:
    out = subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def spread(values: list[float]) -> dict:
    """median, min, max and the relative half-range of repeated measurements."""
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / 2 / med if med else 0.0}
