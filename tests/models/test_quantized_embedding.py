"""--quantize-embedding: the token embedding and the LM head stored in a weight-only format.

Checked against transformers with the same weights quantized -> dequantized (embedding and head
included), against the format's float64 reference for row lookups, and for storage: a tied table
is held once, and an all-nvfp4 model is 3.5x smaller than its bf16 parameters.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.models.test_engine_vs_hf import PROMPTS, hf_greedy
from tests.models.test_quant_models import (
    GREEDY,
    SCORE,
    dequantized_hf,
    hf_prompt_logprobs,
    prompt_logprobs,
)
from tokenmill import LLM
from tokenmill.bench.quant import model_bytes
from tokenmill.config import QuantConfig
from tokenmill.layers.embedding import QuantizedEmbedding
from tokenmill.layers.linear import Linear
from tokenmill.quant import quantize
from tokenmill.quant.checkpoint_writer import quantize_checkpoint
from tokenmill.quant.formats import FORMATS, take_rows

KW = {"dtype": "float32", "kv_cache_memory": 1 << 22}


def model_of(llm):
    return llm.engine.loaded.model


@pytest.mark.parametrize("fmt", FORMATS)
def test_take_rows_equals_rows_of_the_float64_dequantization(fmt):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 128, generator=gen) * torch.logspace(-3, 2, 40)[:, None]
    q = quantize(x, fmt, **({"group_size": 64} if fmt == "int4" else {}))
    index = torch.tensor([5, 0, 39, 5, 17])  # repeats, any order
    rows = take_rows(q, index)
    assert rows.shape == (5, 128) and rows.format == fmt
    assert torch.equal(rows.dequantize(torch.float64), q.dequantize(torch.float64)[index])
    table = QuantizedEmbedding(q, torch.float32)
    looked_up = table(index.view(1, 5))
    assert looked_up.shape == (1, 5, 128)
    torch.testing.assert_close(looked_up[0], q.dequantize()[index], rtol=1e-6, atol=0)


def dequantized_hf_all(folder, fmt):
    """transformers with the linear layers, the embedding and the head quantized -> dequantized
    (a tied table once: it is one tensor there too)."""
    model = dequantized_hf(folder, fmt)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.copy_(quantize(embed, fmt).dequantize())
        head = model.get_output_embeddings().weight
        if head.data_ptr() != embed.data_ptr():
            head.copy_(quantize(head, fmt).dequantize())
    return model


@pytest.mark.parametrize(("kind", "fmt"), [("qwen2", "nvfp4"), ("llama", "int8")])
def test_quantized_embedding_model_equals_transformers(tiny_model_dir, kind, fmt):
    folder = tiny_model_dir(kind)  # qwen2: tied embeddings; llama: its own head
    llm = LLM(folder, quantization=fmt, quantize_embedding=True, **KW)
    model = model_of(llm)
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and embed.qweight.format == fmt
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings")
    assert model.embedding_source == ("head" if tied else "own")
    # a tied table is one set of codes, read by the lookup and by the head
    shared = embed.qweight.data.data_ptr() == model.lm_head.quant_method.qweight.data.data_ptr()
    assert shared == bool(tied)
    reference = dequantized_hf_all(folder, fmt)
    ours = prompt_logprobs(llm.generate(PROMPTS, SCORE, use_tqdm=False))
    for a, b in zip(ours, hf_prompt_logprobs(reference, llm)):
        torch.testing.assert_close(
            torch.tensor(a), torch.tensor(b, dtype=torch.float32), atol=1e-4, rtol=0
        )
    for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        assert list(o.outputs[0].token_ids) == hf_greedy(reference, list(o.prompt_token_ids), 8)


def weight_bytes(model) -> int:
    """What the model holds, less the rotary tables (not weights)."""
    rotary = sum(b.numel() * b.element_size() for b in model.model.rotary.buffers())
    rotary += sum(
        t.numel() * t.element_size()
        for t in vars(model.model.rotary).values()
        if isinstance(t, torch.Tensor)
    )
    return model_bytes(model) - rotary


def test_nvfp4_with_embedding_stores_4_5_bits_per_weight(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    kw = {"dtype": "bfloat16", "kv_cache_memory": 1 << 22}
    linears_only = model_of(LLM(folder, quantization="nvfp4", **kw))
    everything = model_of(LLM(folder, quantization="nvfp4", quantize_embedding=True, **kw))
    # the bf16 embedding and its packed head copy are gone; one nvfp4 table instead
    embed = everything.model.embed_tokens.qweight
    assert (
        weight_bytes(linears_only) - weight_bytes(everything) > 2 * 2 * math.prod(embed.shape) // 4
    )
    # what the model holds is exactly its quantized tables (a tied one once) and the bf16
    # norms and biases: nothing else stays behind (calibration statistics, float copies)
    held = [m.quant_method.qweight if isinstance(m, Linear) else m.qweight
            for m in everything.modules() if isinstance(m, Linear | QuantizedEmbedding)]  # fmt: skip
    tables = {q.data.data_ptr(): q for q in held}
    plain = sum(p.numel() * 2 for p in everything.parameters())
    assert weight_bytes(everything) == sum(q.nbytes for q in tables.values()) + plain
    for q in tables.values():  # 4-bit codes + one E4M3 per 16: 4.5 bits, 2 / 0.5625 = 3.56x bf16
        assert q.data.numel() + q.scale.numel() == math.prod(q.shape) * 9 // 16
        assert q.global_scale.numel() in (1, q.shape[0])  # fp32 per tensor (per shard's rows)


def test_calibrated_head_checkpoint_loads_as_on_load(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen2")
    options = {"quantization": "nvfp4", "gptq": True, "scale_search": True}
    on_load = LLM(folder, quantize_embedding=True, **options, **KW)
    head = model_of(on_load).lm_head
    assert head.quant_method.calibration is None  # statistics dropped once quantized
    rtn = LLM(folder, quantization="nvfp4", quantize_embedding=True, **KW)
    expected = prompt_logprobs(on_load.generate(PROMPTS, SCORE, use_tqdm=False))
    assert expected != prompt_logprobs(rtn.generate(PROMPTS, SCORE, use_tqdm=False))
    qcfg = quantize_checkpoint(
        folder, tmp_path / "q", "nvfp4", {"gptq": True, "scale_search": True}, None, True
    )
    assert qcfg["quantize_embedding"] is True
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.weight_packed" in state  # the tied table, stored once, as the head
    assert not any(name.startswith("model.embed_tokens") for name in state)
    again = LLM(tmp_path / "q", **KW)
    assert isinstance(model_of(again).model.embed_tokens, QuantizedEmbedding)
    assert prompt_logprobs(again.generate(PROMPTS, SCORE, use_tqdm=False)) == expected


def test_untied_checkpoint_stores_both_tables(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    quantize_checkpoint(folder, tmp_path / "q", "int4", {"group_size": 32}, None, True)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert {"lm_head.weight_packed", "model.embed_tokens.weight_packed"} <= set(state)
    assert "model.embed_tokens.weight" not in state and "lm_head.weight" not in state
    on_load = LLM(folder, quantization="int4", group_size=32, quantize_embedding=True, **KW)
    again = LLM(tmp_path / "q", **KW)
    a = prompt_logprobs(on_load.generate(PROMPTS, SCORE, use_tqdm=False))
    assert prompt_logprobs(again.generate(PROMPTS, SCORE, use_tqdm=False)) == a


def test_rotation_unties_a_quantized_embedding(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    llm = LLM(folder, quantization="int8", quantize_embedding=True, rotate=True, **KW)
    model = model_of(llm)
    assert model.embedding_source == "own" and not model.arch.tie_word_embeddings
    assert (
        model.model.embed_tokens.qweight.data.data_ptr()
        != model.lm_head.quant_method.qweight.data.data_ptr()
    )
    plain = LLM(folder, **KW)
    a = prompt_logprobs(plain.generate(PROMPTS, SCORE, use_tqdm=False))
    b = prompt_logprobs(llm.generate(PROMPTS, SCORE, use_tqdm=False))
    diff = torch.tensor([x - y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]).abs()
    assert 0 < diff.mean() < 0.02  # int8 everywhere, rotated: the same function, rounded


@pytest.mark.parametrize("method", [None, "w8a8", "fp8"])
def test_quantize_embedding_needs_a_weight_only_format(method):
    with pytest.raises(ValueError, match="quantize_embedding applies to weight-only"):
        QuantConfig(quantization=method, quantize_embedding=True)
