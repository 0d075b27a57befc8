"""Every quantization method side by side in one run: weight MiB, decode tokens/s at batch 1 and
32, prefill tokens/s, and (on a real model) perplexity change with a 95% paired-bootstrap
interval, KL divergence and top-1 agreement against the unquantized model in the same dtype.

    python benchmarks/quantization.py [--model default] [--dtype bfloat16] [--max-windows 8]
        [--methods w8a8,fp8,int4,nvfp4+embedding,...] [--no-quality] [--touch-kv] [--compile]
        [--json-out F]

The first rows are the unquantized model in float32 (the issue's speed baseline) and in --dtype
(the quality reference). Random-weight models: pass --no-quality (their perplexity means nothing).
"""

from __future__ import annotations

import argparse
import json
import time

from tqdm.auto import tqdm

from tokenmill.bench.offline import commit, machine
from tokenmill.bench.quant import add_quality, measure, release
from tokenmill.config import QUANTIZATIONS

KV_ROWS = [(None, "int8"), (None, "fp8_e4m3")]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument(
        "--methods",
        default=",".join(QUANTIZATIONS),
        help="comma-separated; a weight-only format + '+embedding' quantizes the embedding and "
        "LM head too (--quantize-embedding)",
    )
    ap.add_argument("--output-len", type=int, default=32, help="decode tokens per request")
    ap.add_argument("--max-windows", type=int, default=8, help="512-token windows scored")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument(
        "--touch-kv", action="store_true", help="write each KV pool once first (warm server)"
    )
    ap.add_argument("--no-kv-rows", action="store_true", help="skip the KV cache dtype rows")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every configuration (the first row, the fp32 baseline, stays eager; "
        "a compiled fp32 row follows it)",
    )
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    c = args.compile
    configs = [("float32", None, "auto", False)] + ([("float32", None, "auto", True)] if c else [])
    configs += [(args.dtype, None, "auto", c)]
    configs += [(args.dtype, m, "auto", c) for m in args.methods.split(",") if m]
    configs += [] if args.no_kv_rows else [(args.dtype, m, kv, c) for m, kv in KV_ROWS]
    reference, ids, rows = None, None, []
    for dtype, method, kv, comp in tqdm(configs, desc="configurations", unit="config"):
        llm, row = measure(args.model, dtype, method, kv, args.output_len, args.touch_kv, comp)
        if not args.no_quality and dtype == args.dtype:
            if reference is None:
                from tokenmill.quant.eval import default_text

                reference, ids = llm, llm.get_tokenizer().encode(default_text())
            add_quality(row, reference, llm, ids, args.max_windows)
        rows.append(row)
        print(json.dumps(row.as_dict()), flush=True)
        if llm is not reference:
            release(llm)
    stamp = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    print_table(rows, stamp, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {**stamp, "args": vars(args), "rows": [r.as_dict() for r in rows]}, f, indent=2
            )


def print_table(rows, stamp, args) -> None:
    fp32 = rows[0]
    print(f"\n{stamp['machine']}, commit {stamp['commit']}, {stamp['date']}, model {args.model}")
    print(
        "| method | dtype | weights MiB | decode b1 tok/s | decode b32 tok/s (x fp32) "
        "| prefill tok/s | ppl | ppl change % [95% CI, 100 x delta log-ppl] | KL nats | top-1 % | kernel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = (
            f"{r.ppl:.3f} | {r.ppl_change_pct:+.2f} [{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
            f"{' *' if r.significant else ''} | {r.kl:.4f} | {100 * r.top1:.1f}"
            if r.ppl is not None
            else "- | - | - | -"
        )
        print(
            f"| {r.name} | {r.dtype} | {r.weight_mib:.1f} | {r.decode_b1_tps:.1f} | "
            f"{r.decode_b32_tps:.1f} ({r.decode_b32_tps / fp32.decode_b32_tps:.2f}x) | "
            f"{r.prefill_tps:.0f} | {q} | {r.kernel} |"
        )


if __name__ == "__main__":
    main()
