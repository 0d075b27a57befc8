"""`tokenmill quantize` and `tokenmill eval perplexity`: the precision commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenmill.cli_options import add_config_options
from tokenmill.config import QUANTIZERS, QuantConfig, option_help


def add_parsers(sub, add_engine_options) -> None:
    q = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint",
        description="Quantize the linear layers of a 16/32-bit Hugging Face folder and write a "
        "safetensors checkpoint that `tokenmill serve --model OUT` loads without re-quantizing.",
    )
    q.add_argument("--model", required=True, help="HF folder with safetensors weights")
    q.add_argument("--method", required=True, choices=QUANTIZERS)
    q.add_argument("--out", required=True, help="folder to write")
    add_config_options(
        q.add_argument_group("quantization options"),
        option_help((QuantConfig,)),
        skip={"quantization"},  # --method
    )

    e = sub.add_parser("eval", help="quality evaluation").add_subparsers(dest="eval", required=True)
    p = e.add_parser(
        "perplexity",
        help="perplexity, and a paired comparison against the unquantized model",
        description="Perplexity over non-overlapping windows of a text. With --quantization or "
        "--kv-cache-dtype, the same model unquantized is the reference: delta log-perplexity "
        "with a 95%% paired-bootstrap interval over windows, KL divergence and top-1 agreement. "
        "With --kv-tier-dtype, each window's history comes back from a compressed KV tier (the "
        "reference's from an exact one) and the tokens after it are scored.",
    )
    p.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    p.add_argument(
        "--dataset", default="default", help="a UTF-8 text file, or 'default' (Shakespeare)"
    )
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--history",
        type=int,
        default=None,
        help="with --kv-tier-dtype: tokens at the start of each window (whole KV blocks) that "
        "come back from a KV tier of that format before the rest is scored over them (default: "
        "half the window); only the tokens after them are scored",
    )
    add_engine_options(p)


def run(args: argparse.Namespace, engine_config) -> int:
    if args.command == "quantize":
        return quantize(args)
    # the tier format is what is evaluated here, on scratch caches: no tier is set up
    tier_dtype, args.kv_tier_dtype = args.kv_tier_dtype, None
    if tier_dtype == "auto":
        tier_dtype = None
    return eval_perplexity(args, engine_config(args), tier_dtype)


def quantize(args) -> int:
    from tokenmill.quant.checkpoint_writer import quantize_checkpoint

    src = Path(args.model)
    if not (src / "config.json").exists():
        raise ValueError(f"{src} is not a Hugging Face folder; quantize reads safetensors folders")
    given = {n: getattr(args, n) for n in option_help((QuantConfig,)) if n != "quantization"}
    quant = QuantConfig(
        quantization=args.method, **{k: v for k, v in given.items() if v is not None}
    )
    options = quant.method_options()
    qcfg = quantize_checkpoint(
        src, Path(args.out), args.method, options, quant.rotation_seeds, quant.quantize_embedding
    )
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    before = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB (from {before / 2**20:.1f} MiB), {qcfg}")
    return 0


def eval_perplexity(args, config, tier_dtype: str | None = None) -> int:
    from dataclasses import replace

    from tqdm.auto import tqdm

    from tokenmill import LLM
    from tokenmill.quant.eval import compare, default_text

    text = default_text() if args.dataset == "default" else Path(args.dataset).read_text()
    candidate = LLM(config=config)
    ids = candidate.get_tokenizer().encode(text)
    plain = QuantConfig()  # the reference: no quantization, and none of its options
    plain_cache = replace(config.cache, kv_cache_dtype="auto")
    is_quantized = config.quant.quantization is not None or config.cache != plain_cache
    reference = (
        LLM(config=replace(config, quant=plain, cache=plain_cache)) if is_quantized else candidate
    )
    bar = tqdm(desc="scoring windows", unit="window", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    history = 0
    if tier_dtype is not None:
        block = config.cache.block_size
        history = args.history if args.history is not None else args.window // 2 // block * block
        if history <= 0 or history % block or history >= args.window - 1:
            raise ValueError(
                f"--history must be a positive multiple of the block size ({block}) below "
                f"--window - 1 ({args.window - 1}), got {history}"
            )
    result = compare(
        reference, candidate, ids, args.window, args.max_windows, progress=progress,
        tier_dtype=tier_dtype, history=history,
    )  # fmt: skip
    bar.close()
    out = {
        "model": args.model,
        "quantization": config.quant.quantization,
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "kv_tier_dtype": tier_dtype or "auto",
        "history": history,
        **result.as_dict(),
    }
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"perplexity {result.perplexity:.4f} over {result.num_tokens} tokens "
        f"({result.num_windows} windows of {args.window})"
    )
    if tier_dtype is not None:
        print(f"scored after {history} tokens per window from a {tier_dtype} KV tier")
    if reference is not candidate or tier_dtype is not None:
        verdict = "significant" if result.significant else "not significant"
        print(
            f"reference ({'exact' if reference is candidate else 'unquantized'}) "
            f"{result.reference_perplexity:.4f}; change "
            f"{result.ppl_change_pct:+.2f}%; delta log-ppl {result.delta_log_ppl:+.5f} "
            f"[95% CI {result.ci_low:+.5f}, {result.ci_high:+.5f}]: {verdict}"
        )
        print(
            f"KL(reference || quantized) {result.kl_divergence:.5f} nats/token; "
            f"top-1 agreement {100 * result.top1_agreement:.2f}%"
        )
    return 0
