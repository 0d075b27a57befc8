"""Where one decode step's time goes: torch.profiler over `--steps` decode steps at `--batch`,
printing the ops by self time, how many ops (and, on CUDA, kernel launches) one step makes,
and how much of the wall time the device is busy. Profile before optimizing.

    python benchmarks/profile_decode.py --model DIR [--batch 1] [--steps 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="an HF folder (default: the bundled model)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, default=25, help="ops shown")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype, max_model_len=1024)
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)

    def prompts(offset: int) -> list[dict]:
        return [{"prompt_token_ids": list(range(offset + i, offset + i + 16))} for i in range(args.batch)]  # fmt: skip

    llm.generate(prompts(100), params, use_tqdm=False)  # warm-up
    cuda = llm.engine.loaded.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        outs = llm.generate(prompts(5000), params, use_tqdm=False)
        wall = time.perf_counter() - t
    tpot = sorted(o.metrics.tpot for o in outs)[len(outs) // 2]
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"device {llm.engine.loaded.device}, {args.dtype}, batch {args.batch}: "
          f"median time per output token {tpot * 1e3:.2f} ms; {ops / args.steps:.0f} aten ops "
          f"per step")  # fmt: skip
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6
        print(f"{len(kernels) / args.steps:.0f} CUDA kernels per step; device busy "
              f"{busy:.3f} s of {wall:.3f} s wall ({100 * busy / wall:.0f}%)")  # fmt: skip
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
