"""Serving overhead: `tokenmill serve` at saturation vs the offline engine, same model and
workload, one after the other in one run (never at once: they would share the cores).

    python benchmarks/serving_overhead.py [--num-prompts 64] [--input-len 128] [--output-len 128]

The server gets max_concurrency = num_prompts (all requests in flight, as offline has them) over
loopback, streaming, through `tokenmill.bench.serve`. Each side runs the workload once to warm up
before the measured run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from tokenmill.bench.metrics import report
    from tokenmill.bench.offline import Workload, commit, machine
    from tokenmill.bench.serve import Sample, run_load, wait_ready

    work = Workload(args.num_prompts, args.input_len, args.output_len)
    prompts = work.prompts(49152)
    samples = [Sample(p, work.output_len) for p in prompts]
    # warm-up prompts differ from the measured ones, so the prefix cache gives nothing away
    warm = Workload(args.num_prompts, args.input_len, args.output_len, seed=1).prompts(49152)

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "serve",
            "--port",
            str(args.port),
            "--max-model-len",
            "1024",
            "--dtype",
            args.dtype,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, 120, alive=lambda: server.poll() is None)
        # warm-up with the whole workload: first-touch page faults and oneDNN's kernel creation
        # for each new batch shape would otherwise land on whichever side runs first
        warm_samples = [Sample(p, work.output_len) for p in warm]
        asyncio.run(run_load(url, warm_samples, max_concurrency=len(samples), progress=False))
        records, duration = asyncio.run(run_load(url, samples, max_concurrency=len(samples)))
        served = report(records, duration)
    finally:
        server.terminate()
        server.wait(60)

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.offline import run_tokenmill

    llm = LLM(dtype=args.dtype, max_model_len=1024)
    llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:4]],
        SamplingParams(max_tokens=work.output_len, ignore_eos=True),
        use_tqdm=False,
    )
    offline = run_tokenmill(llm, prompts, work.output_len)
    result = {
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "workload": vars(work),
        "server_output_tokens_per_s": served["output_throughput"],
        "offline_output_tokens_per_s": offline.output_tokens_per_s,
        "server_over_offline": served["output_throughput"] / offline.output_tokens_per_s,
        "server": served,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
