"""A random-weight Llama of about 1B parameters (hidden 2048, 16 layers, 32 heads / 8 KV heads,
MLP 8192, tied embeddings) with SmolLM2's tokenizer (vocab 49,152), saved in float32 as an HF
folder: the larger shape of the peer comparison. Random weights: speed only, never quality.

    python benchmarks/peers/make_1b.py OUT_DIR --tokenizer-from /tmp/smollm2-hf
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import transformers


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="export_default.py's folder")
    args = ap.parse_args()
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    model.save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(args.tokenizer_from / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
