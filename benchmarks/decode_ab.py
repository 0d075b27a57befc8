"""Decode speed of several engine configurations, interleaved in one process, so that the drift
of a noisy machine hits each alike: rounds of (batch x prompt-len tokens -> output tokens) per
configuration in turn, fresh prompts every round, median decode tokens/s (batch / median time
per output token), its ratio to the first configuration's median, and the ratios within each
round (median and range).

    python benchmarks/decode_ab.py --model DIR --rounds 7 --batch 32 \\
        float32 float32+compile bfloat16+compile w8a8/bfloat16+compile float32+torch-kernels

A configuration is [METHOD/]DTYPE[+FLAG...]: METHOD a --quantization, FLAG `compile`,
`torch-kernels` (the gather + SDPA decode attention instead of the native kernel), `rotate`
(--rotate), `gemm-only` (oneDNN's GEMM at every batch size: layers/skinny.py's kernel taken off
after loading, for A/B runs of it), `unfused` (the decoder layers' halves as separate calls:
layers/fused_decode.py taken off) or `unlooped` (the layers of a decode step called one by one
from Python: layers/decode_layers.py taken off).
"""

from __future__ import annotations

import argparse
import statistics

from tqdm.auto import tqdm

FLAGS = {
    "compile": ("compile", True),
    "torch-kernels": ("cpu_kernels", "torch"),
    "rotate": ("rotate", True),
}


def parse(spec: str) -> dict:
    body, *flags = spec.split("+")
    method, _, dtype = body.rpartition("/")
    out = {"dtype": dtype, "quantization": method or None}
    for flag in flags:
        if flag in ("gemm-only", "unfused", "unlooped"):
            out[flag] = True
            continue
        if flag not in FLAGS:
            raise SystemExit(f"{spec!r}: a flag after '+' is one of {sorted(FLAGS)}")
        key, value = FLAGS[flag]
        out[key] = value
    return out


def without_skinny_kernels(model) -> None:
    """Every packed linear layer (and a tied head) back on oneDNN's GEMM for all sizes."""
    for module in model.modules():
        if hasattr(getattr(module, "quant_method", None), "block_cols"):
            module.quant_method.block_cols = 0
    if hasattr(model, "tied_head_block_cols"):
        model.tied_head_block_cols = 0


def without_fused_halves(model) -> None:
    for layer in model.compile_units():
        layer.fused_inputs = layer.fused_outputs = None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("configs", nargs="+", help="e.g. float32 w8a8/bfloat16+compile")
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()

    from tokenmill import LLM
    from tokenmill.bench.offline import commit, machine, touch_kv_cache
    from tokenmill.bench.quant import decode_tps

    engines = []
    for spec in tqdm(args.configs, desc="loading", unit="config"):
        options = parse(spec)
        gemm_only, unfused = options.pop("gemm-only", False), options.pop("unfused", False)
        unlooped = options.pop("unlooped", False)
        llm = LLM(args.model, max_model_len=1024, kv_cache_memory=512 << 20, **options)
        if unlooped:
            llm.engine.runner.model.decode_layers = None
        if gemm_only or unfused:
            without_fused_halves(llm.engine.runner.model)
        if gemm_only:
            without_skinny_kernels(llm.engine.runner.model)
        touch_kv_cache(llm)  # first-touch page faults out of the figures
        vocab = llm.engine.loaded.arch.vocab_size
        decode_tps(llm, args.batch, 4, vocab, seed=10_000)  # warm-up at the measured batch
        engines.append((spec, llm, vocab))
    results: dict[str, list[float]] = {spec: [] for spec in args.configs}
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for spec, llm, vocab in engines:
            results[spec].append(
                decode_tps(llm, args.batch, args.output_len, vocab, r, args.prompt_len)
            )
    base = statistics.median(results[args.configs[0]])
    print(
        f"\n{machine()}, commit {commit()}, model {args.model}, batch {args.batch}, "
        f"{args.prompt_len}-token prompts -> {args.output_len}, {args.rounds} interleaved rounds"
    )
    print("| configuration | decode tok/s, median | all rounds | x first | x first, per round |")
    print("|---|---:|---|---:|---|")
    first = results[args.configs[0]]
    for spec, values in results.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        ratios = sorted(v / f for v, f in zip(values, first))
        spread = f"median {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        print(f"| {spec} | {med:.1f} | {runs} | {med / base:.2f}x | {spread} |")


if __name__ == "__main__":
    main()
