"""Write the bundled SmolLM2-135M-Instruct (a Q4_1 GGUF) as a Hugging Face folder, so that every
engine compared in benchmarks/peers runs the very same weights: the GGUF dequantized to float32
(as tokenmill loads it), with its tokenizer and chat template.

    python benchmarks/peers/export_default.py OUT_DIR [--check]

--check loads the folder with transformers and compares its logits with tokenmill's on the GGUF.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def export(out: Path) -> Path:
    from tokenmill.models.gguf import GGUFFile, arch_from_gguf, gguf_weights, resolve_default_model
    from tokenmill.models.gguf_tokenizer import tokenizer_from_gguf

    f = GGUFFile(resolve_default_model())
    arch = arch_from_gguf(f)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: w.contiguous() for n, w in gguf_weights(f, arch, torch.float32)}
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": [arch.architecture],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_ids)[0] if arch.eos_token_ids else None,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(arch.eos_token_ids), "bos_token_id": arch.bos_token_id})
    )
    tok = tokenizer_from_gguf(f.metadata)
    tok.backend.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": arch.max_position_embeddings,
        "chat_template": tok.chat_template,
        **{k: v for k, v in tok.special_tokens.items() if v is not None},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out


def check(out: Path) -> float:
    import transformers

    from tokenmill import LLM

    text = "The quick brown fox jumps over the lazy dog. Paged attention"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    llm = LLM("default", dtype="float32", max_model_len=512, kv_cache_memory=64 << 20)
    ids = llm.get_tokenizer().encode(text)
    assert hf_tok(text)["input_ids"] == ids, "tokenizers differ"
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    ours = llm.engine.runner.score(ids)
    return float((ours - theirs).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    print(f"wrote {export(args.out)}")
    if args.check:
        print(f"max |logit difference| vs tokenmill on the GGUF: {check(args.out):.2e}")


if __name__ == "__main__":
    main()
