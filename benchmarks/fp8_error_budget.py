"""Where fp8's perplexity cost comes from: the weights' rounding, the activations', or both.

Each row is scored against the unquantized model (same dtype) on the same windows of text, as
`tokenmill eval perplexity` does: perplexity change, 95% paired-bootstrap interval of delta
log-perplexity (100x), KL divergence and top-1 agreement.

  fp8 weights only            E4M3 weights per channel (weight-only fp8_e4m3), exact activations
  fp8 weights only, GPTQ      the same with GPTQ codes
  fp8 activations only        E4M3 activations per token (current scaling), exact weights: the
                              fp8 method with each layer's float weight put back after it is
                              quantized (a measurement, not a serving mode)
  fp8 (weights + activations) the fp8 method, SmoothQuant alpha 0, and with its defaults

    python benchmarks/fp8_error_budget.py [--model default] [--dataset FILE] [--max-windows 8]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm


@contextmanager
def exact_weights():
    """While open, the fp8 method keeps each layer's float weight for its GEMM (weight scale 1),
    so only the activations are rounded to E4M3."""
    from tokenmill.layers.linear import pack_for_cpu
    from tokenmill.quant.methods import FP8Method, QuantMethod
    from tokenmill.quant.methods.fp8 import EmulatedFp8Kernel

    def process(self, layer) -> None:
        weight = layer.weight.data.clone()
        QuantMethod.process_weights_after_loading(self, layer)
        if self.input_smooth is not None:
            raise ValueError("activations-only needs smoothquant_alpha=0")
        kernel = self.impl
        if not isinstance(kernel, EmulatedFp8Kernel):
            raise ValueError("activations-only runs the emulated (CPU) fp8 path")
        kernel.packed = pack_for_cpu(weight)  # the float weight itself, at scale 1
        kernel.values = weight if kernel.packed is None else None
        kernel.weight_scale = torch.ones_like(kernel.weight_scale)

    FP8Method.process_weights_after_loading = process
    try:
        yield
    finally:
        del FP8Method.process_weights_after_loading  # back to QuantMethod's


ROWS = [
    ("fp8 weights only", {"quantization": "fp8_e4m3"}, False),
    ("fp8 weights only, GPTQ", {"quantization": "fp8_e4m3", "gptq": True}, False),
    ("fp8 activations only", {"quantization": "fp8", "smoothquant_alpha": 0.0}, True),
    ("fp8, SmoothQuant alpha 0", {"quantization": "fp8", "smoothquant_alpha": 0.0}, False),
    ("fp8 (defaults: alpha 0.5)", {"quantization": "fp8"}, False),
    ("fp8, GPTQ", {"quantization": "fp8", "gptq": True}, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default="default", help="a text file (default: Midsummer)")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    from tokenmill import LLM
    from tokenmill.quant.eval import compare, default_text

    text = default_text() if args.dataset == "default" else Path(args.dataset).read_text()
    kw = {"dtype": args.dtype, "max_model_len": 1024}
    reference = LLM(args.model, **kw)
    ids = reference.get_tokenizer().encode(text)
    print(f"{args.model}, {args.dtype}, {args.max_windows} windows, {time.strftime('%Y-%m-%d')}")
    print("| configuration | ppl change | 95% CI (100 x delta log-ppl) | KL | top-1 |")
    print("|---|---:|---|---:|---:|")
    for name, options, activations_only in tqdm(ROWS, desc="configurations", leave=False):
        if activations_only:
            with exact_weights():
                candidate = LLM(args.model, **kw, **options)
        else:
            candidate = LLM(args.model, **kw, **options)
        c = compare(reference, candidate, ids, max_windows=args.max_windows)
        mark = " *" if c.significant else ""
        print(
            f"| {name} | {c.ppl_change_pct:+.2f}% | [{100 * c.ci_low:+.2f}, "
            f"{100 * c.ci_high:+.2f}]{mark} | {c.kl_divergence:.4f} | "
            f"{100 * c.top1_agreement:.1f}% |",
            flush=True,
        )
        del candidate


if __name__ == "__main__":
    main()
