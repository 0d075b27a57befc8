"""A random-weight copy of an HF model folder's architecture: its config.json, tokenizer and
generation config, with freshly initialised float32 weights (seed 0). For speed measurements
where the real weights cannot travel (a GPU machine with no model hub); never for quality.

    python benchmarks/make_random_model.py OUT_DIR --like DIR_WITH_CONFIG_AND_TOKENIZER
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import transformers

COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", type=Path, required=True, help="a folder with config.json")
    args = ap.parse_args()
    config = transformers.AutoConfig.from_pretrained(args.like)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    model.save_pretrained(args.out, safe_serialization=True)
    for name in COPIED:
        if (args.like / name).exists():
            shutil.copy2(args.like / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
