"""tokenmill vs transformers.generate, side by side in one run, on the bundled SmolLM2-135M-Instruct
(the GGUF dequantized to fp32 by each engine) or an HF folder (--model): offline throughput on
64 x (128 -> 128) random token prompts, greedy, EOS ignored; batch-1 decode speed; start-up time.
Both engines run on the same device (CUDA when there is one, else CPU).

    python benchmarks/offline_throughput.py [--model DIR] [--repeats 3] [--num-prompts 64]
        [--dtype float32|bfloat16] [--compile] [--cpu-kernels torch] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="for both engines"
    )
    ap.add_argument("--model", default=None, help="an HF folder (default: the bundled model)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument(
        "--compile", action="store_true", help="tokenmill with torch.compile'd layers (--compile)"
    )
    ap.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=["auto", "torch", "native"],
        help="tokenmill's decode attention (native: the in-place paged kernel on CPU)",
    )
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from tokenmill.bench.offline import (
        Workload,
        commit,
        hf_decode_tps,
        machine,
        memory_bandwidth_gbs,
        run_hf,
        run_tokenmill,
        tokenmill_decode_tps,
    )

    t0 = time.perf_counter()
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        args.model or "default",
        dtype=args.dtype,
        max_model_len=1024,
        device=args.device,
        compile=args.compile,
        cpu_kernels=args.cpu_kernels,
    )
    llm.generate(["Hello"], SamplingParams(max_tokens=1), use_tqdm=False)
    startup_s = time.perf_counter() - t0
    arch = llm.engine.loaded.arch
    # bytes one decode step reads: every weight once (the tied head counted once, as the head)
    step_bytes = arch.num_params * getattr(torch, args.dtype).itemsize
    work = Workload(args.num_prompts, args.input_len, args.output_len)

    import transformers

    device = llm.engine.loaded.device
    bw = memory_bandwidth_gbs(device=device)
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from tokenmill.models.gguf import DEFAULT_FILE, resolve_default_model

        path = resolve_default_model()
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=DEFAULT_FILE, dtype=dtype
        )
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ref = ref.to(device).eval()

    # warm-up on other prompts (no prefix-cache hits later): first-touch pages, oneDNN kernels
    warm = Workload(args.num_prompts, args.input_len, args.output_len, seed=1)
    run_tokenmill(llm, warm.prompts(arch.vocab_size), work.output_len)
    tm, hf, tm_b1, hf_b1, ttft = [], [], [], [], []
    for rep in range(args.repeats):  # interleaved, so drift hits both alike
        # fresh prompts each repeat: tokenmill's prefix cache must not reuse an earlier run's
        prompts = Workload(
            args.num_prompts, args.input_len, args.output_len, seed=100 + rep
        ).prompts(arch.vocab_size)
        tm.append(run_tokenmill(llm, prompts, work.output_len).output_tokens_per_s)
        single = prompts[0][::-1]  # not a prefix of anything cached
        tps, first = tokenmill_decode_tps(llm, single, work.output_len)
        tm_b1.append(tps)
        ttft.append(first)
        hf.append(run_hf(ref, prompts, work.output_len, pad_id=2).output_tokens_per_s)
        hf_b1.append(hf_decode_tps(ref, single, work.output_len, pad_id=2))
    med = statistics.median
    limit_tps = bw["copy"] * 1e9 / step_bytes
    report = {
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "bundled SmolLM2-135M-Instruct",
        "device": str(device),
        "workload": vars(work),
        "dtype": args.dtype,
        "compile": args.compile,
        "repeats": args.repeats,
        "memory_bandwidth_gbs": bw,
        "decode_step_bytes": step_bytes,
        "tokenmill_startup_s": startup_s,
        "offline_tokens_per_s": {
            "tokenmill": med(tm),
            "transformers": med(hf),
            "ratio": med(tm) / med(hf),
            "all_tokenmill": tm,
            "all_hf": hf,
        },
        "batch1_decode_tokens_per_s": {
            "tokenmill": med(tm_b1),
            "transformers": med(hf_b1),
            "ratio": med(tm_b1) / med(hf_b1),
            "bandwidth_limit_copy": limit_tps,
            "fraction_of_limit": med(tm_b1) / limit_tps,
        },
        "tokenmill_batch1_ttft_s": med(ttft),
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
