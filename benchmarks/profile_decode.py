"""Where one decode step's time goes: torch.profiler over `--steps` decode steps at `--batch`,
printing the ops by self time, how many ops (and, on CUDA, kernel launches) one step makes,
and how much of the wall time the device is busy. With --breakdown (CPU): wall time per decode
step by part of the model, on decode-only steps (tokenmill/bench/breakdown.py); --touch-kv
writes the whole KV pool first, which takes the first-touch page faults of fresh KV blocks out
of the figures. Profile before optimizing.

    python benchmarks/profile_decode.py --model DIR [--batch 1] [--steps 32] [--prompt-len 16]
        [--dtype bfloat16]
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
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, default=25, help="ops shown")
    ap.add_argument("--breakdown", action="store_true", help="wall time per model part")
    ap.add_argument("--unlooped", action="store_true",
                    help="with --breakdown: the decoder layers called one by one (their parts "
                    "shown) instead of as one native call (layers/decode_layers.py)")  # fmt: skip
    ap.add_argument("--touch-kv", action="store_true", help="write the KV pool once first")
    ap.add_argument("--quantization", default=None, help="a quantization method, e.g. w8a8")
    ap.add_argument("--cpu-kernels", default="auto", choices=["auto", "torch", "native"])
    ap.add_argument("--rotate", action="store_true", help="--rotate (with --quantization)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the layers")
    args = ap.parse_args()
    llm = LLM(
        args.model or "default",
        dtype=args.dtype,
        max_model_len=1024,
        quantization=args.quantization,
        cpu_kernels=args.cpu_kernels,
        rotate=args.rotate,
        compile=args.compile,
    )
    if args.touch_kv:
        from tokenmill.bench.offline import touch_kv_cache

        touch_kv_cache(llm)
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)

    def prompts(offset: int) -> list[dict]:
        n = args.prompt_len
        return [{"prompt_token_ids": list(range(offset + i, offset + i + n))} for i in range(args.batch)]  # fmt: skip

    llm.generate(prompts(100), params, use_tqdm=False)  # warm-up
    if args.breakdown:
        from tokenmill.bench.breakdown import decode_breakdown

        ids = [p["prompt_token_ids"] for p in prompts(5000)]
        wall, parts = decode_breakdown(llm, ids, args.steps, looped=not args.unlooped)
        print(f"{args.dtype}, batch {args.batch}, context {args.prompt_len}+: {wall:.1f} ms "
              f"per decode step ({1e3 * args.batch / wall:.0f} tok/s)")  # fmt: skip
        for label, ms in parts.items():
            print(f"  {label:28s} {ms:7.2f} ms  {100 * ms / wall:5.1f}%")
        print(f"  {'(rest: engine, Python)':28s} {wall - sum(parts.values()):7.2f} ms")
        return
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
