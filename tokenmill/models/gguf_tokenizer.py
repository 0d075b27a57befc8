"""A `tokenizers` byte-level BPE built from a GGUF file's vocabulary, merges and chat template.

Built as transformers builds it from GGUF metadata (same BPE settings, control tokens added as
special), with one deliberate difference: for llama.cpp's `smollm` pre-tokenizer, digits are split
one by one, as the original SmolLM2 tokenizer.json and llama.cpp do (transformers' GGUF converter
does not know this rule and keeps digit runs together).
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from tokenmill.models.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported yet; supported: 'gpt2' (byte-level BPE)"
        )
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    backend = RustTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab
        ]
    )

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
    }
    if metadata.get("tokenizer.ggml.add_bos_token") and special["bos_token"]:
        from tokenizers import processors

        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])],
        )
    return Tokenizer(backend, special, metadata.get("tokenizer.chat_template"))
