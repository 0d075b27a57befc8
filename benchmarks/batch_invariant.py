"""--batch-invariant on the bundled model: is a request's output bit-equal alone and amid load,
and what does the mode cost? Both engines (default kernels, batch-invariant) in one run.

    python benchmarks/batch_invariant.py [--dtype float32 bfloat16] [--num-prompts 32]

Equality: one 100-token prompt, greedy and seeded (top_p 0.9), 32 tokens with logprobs, alone and
amid 15 other random prompts at three positions (chunked prefill cuts it differently). Cost:
offline tokens/s of num_prompts x (input_len -> output_len) and batch-1 decode tokens/s.
"""

from __future__ import annotations

import argparse
import random
import time

from tqdm.auto import tqdm


def outputs(llm, params, others, at, target):
    prompts = others[:at] + [{"prompt_token_ids": target}] + others[at:]
    out = llm.generate(prompts, params, use_tqdm=False)[at].outputs[0]
    return out.token_ids, out.logprobs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.ab import emit
    from tokenmill.bench.offline import Workload, commit, machine

    rng = random.Random(0)
    target = [rng.randrange(100, 49000) for _ in range(100)]
    others = [[rng.randrange(100, 49000) for _ in range(rng.randrange(5, 300))] for _ in range(15)]
    others = [{"prompt_token_ids": p} for p in others]
    checks = {
        "greedy": SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=2),
        "seeded": SamplingParams(
            max_tokens=32, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True, logprobs=2
        ),  # fmt: skip
    }
    work = Workload(args.num_prompts, args.input_len, args.output_len)
    prompts = [{"prompt_token_ids": p} for p in work.prompts(49152)]
    timed = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    results = []
    bar = tqdm(total=2 * len(args.dtype), desc="engines", unit="engine")
    for dtype in args.dtype:
        for invariant in (False, True):
            llm = LLM(dtype=dtype, max_model_len=1024, batch_invariant=invariant,
                      max_num_batched_tokens=256, enable_prefix_caching=False)  # fmt: skip
            row = {"dtype": dtype, "batch_invariant": invariant}
            for name, params in checks.items():
                alone = outputs(llm, params, [], 0, target)
                amid = [outputs(llm, params, others, at, target) for at in (0, 7, 15)]
                row[f"{name}_tokens_equal"] = all(a[0] == alone[0] for a in amid)
                row[f"{name}_logprobs_equal"] = all(a[1] == alone[1] for a in amid)
            llm.generate(prompts[:4], timed, use_tqdm=False)  # warm-up
            t = time.perf_counter()
            outs = llm.generate(prompts, timed, use_tqdm=False)
            dt = time.perf_counter() - t
            row["offline_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
            one = llm.generate(prompts[:1], timed, use_tqdm=False)[0]
            row["batch1_decode_tokens_per_s"] = 1.0 / one.metrics.tpot
            results.append(row)
            bar.update(1)
            del llm
    bar.close()
    report = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "workload": vars(work), "results": results}  # fmt: skip
    emit(report, args.json_out)


if __name__ == "__main__":
    main()
