"""A GGUF re-encoded by llama.cpp's own quantizer (llama_model_quantize), for the peer comparison's
llama.cpp rows at tokenmill's precisions: BF16 and Q8_0 from the F32 file of hf_to_gguf.py.
Runs in the llama.cpp venv (setup_llamacpp.sh).

    benchmarks/peers/.venv-llamacpp/bin/python benchmarks/peers/quantize_gguf.py F32.gguf OUT.gguf bf16|q8_0
"""

from __future__ import annotations

import argparse

import llama_cpp as lc

FTYPES = {"bf16": lc.LLAMA_FTYPE_MOSTLY_BF16, "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("type", choices=sorted(FTYPES))
    args = ap.parse_args()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[args.type]
    params.nthread = 2
    if lc.llama_model_quantize(args.source.encode(), args.out.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {args.source}")
    print(f"wrote {args.out} ({args.type})")


if __name__ == "__main__":
    main()
