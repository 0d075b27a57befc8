"""An F32 GGUF of an HF Llama folder whose tokenizer is SmolLM2's (for llama.cpp in the peer
comparison): tensors renamed to llama.cpp's names, Q/K rows permuted to its rotary layout (the
inverse of what tokenmill's GGUF loader undoes), tokenizer metadata copied from the bundled
SmolLM2 GGUF. `--check` loads both files in tokenmill and compares logits.

    python benchmarks/peers/hf_to_gguf.py HF_DIR OUT.gguf [--check]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from safetensors import safe_open

from tokenmill.models.gguf import _GLOBAL_NAMES, _LAYER_NAMES, resolve_default_model


def permute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's two rotary halves -> llama.cpp's interleaved pairs (inverse of unpermute_qk)."""
    rows = w.shape[0]
    halves = w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:])
    return halves.transpose(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    reverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf in reverse:
        return reverse[hf]
    _, _, layer, rest = hf.split(".", 3)  # model.layers.N.<part>.weight
    part, suffix = rest.rsplit(".", 1)
    gguf_part = {v: k for k, v in _LAYER_NAMES.items()}[part]
    return f"blk.{layer}.{gguf_part}.{suffix}"


def convert(folder: Path, out: str) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    template = GGUFReader(str(resolve_default_model()))
    w = GGUFWriter(out, "llama")
    for name, field in template.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            if kind == GGUFValueType.ARRAY:
                w.add_array(name, field.contents())
            else:
                w.add_key_value(name, field.contents(), kind)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name).float()
            if name.endswith("q_proj.weight"):
                t = permute_qk(t, heads)
            elif name.endswith("k_proj.weight"):
                t = permute_qk(t, kv_heads)
            w.add_tensor(gguf_name(name), np.ascontiguousarray(t.numpy()),
                         raw_dtype=GGMLQuantizationType.F32)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check(folder: Path, out: str) -> float:
    from tokenmill import LLM

    a = LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_memory=256 << 20)
    b = LLM(out, dtype="float32", max_model_len=512, kv_cache_memory=256 << 20)
    ids = a.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    assert ids == b.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    return float((a.engine.runner.score(ids) - b.engine.runner.score(ids)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("folder", type=Path)
    ap.add_argument("out")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    convert(args.folder, args.out)
    print(f"wrote {args.out}")
    if args.check:
        print(
            f"max |logit difference| vs the HF folder in tokenmill: {check(args.folder, args.out):.2e}"
        )


if __name__ == "__main__":
    main()
