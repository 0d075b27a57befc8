"""KV cache in int8 / FP8: exact storage arithmetic, more tokens per byte, consistent logits."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_quant_models import PROMPTS, SCORE, prompt_logprobs
from tokenmill import LLM, SamplingParams
from tokenmill.layers.kv_quant import QuantizedKVAttention
from tokenmill.quant import elements as el

KV = 1 << 22


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
def test_write_then_read_is_the_float64_quantization(kv_dtype):
    backend = QuantizedKVAttention(1.0, kv_dtype, torch.float32)
    kvh, slots, dim = 2, 32, 16
    storage = torch.int8 if kv_dtype == torch.int8 else torch.uint8
    cache = (torch.zeros(2, kvh, slots, dim, dtype=storage), torch.zeros(2, kvh, slots, 1))
    k = torch.randn(5, kvh, dim) * torch.logspace(-3, 2, 5)[:, None, None]
    v = torch.randn(5, kvh, dim)
    where = torch.tensor([3, 7, 8, 20, 31])
    seen_k, _ = backend.write(cache, where, k, v)
    keys, _ = backend.gather_slots(cache, where)  # [kv_heads, 5, dim]
    x = k.double().transpose(0, 1)
    scale = (x.abs().amax(-1, keepdim=True) / (127 if kv_dtype == torch.int8 else 448)).float()
    y = x / scale.double()
    if kv_dtype == torch.int8:
        expected = torch.round(y) * scale.double()
    else:
        expected = el.decode(el.encode(y, el.E4M3), el.E4M3, torch.float64) * scale.double()
    torch.testing.assert_close(keys.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(seen_k.transpose(0, 1), keys)  # prefill sees what decode will read


def test_int8_cache_holds_more_tokens(tiny_model_dir):
    folder = tiny_model_dir("llama")
    plain = LLM(folder, dtype="bfloat16", kv_cache_memory=KV)
    int8 = LLM(folder, dtype="bfloat16", kv_cache_memory=KV, kv_cache_dtype="int8")
    head_dim = plain.engine.loaded.arch.head_dim
    ratio = int8.engine.runner.num_blocks / plain.engine.runner.num_blocks
    assert ratio == pytest.approx(2 * head_dim / (head_dim + 4), rel=0.01)


@pytest.mark.parametrize("kv_cache_dtype,bound", [("int8", 0.02), ("fp8_e4m3", 0.15)])
def test_quantized_cache_is_close_and_consistent(tiny_model_dir, kv_cache_dtype, bound):
    folder = tiny_model_dir("qwen3")
    base = prompt_logprobs(
        LLM(folder, dtype="float32", kv_cache_memory=KV).generate(PROMPTS, SCORE)
    )
    whole = LLM(folder, dtype="float32", kv_cache_memory=KV, kv_cache_dtype=kv_cache_dtype)
    chunked = LLM(
        folder,
        dtype="float32",
        kv_cache_memory=KV,
        kv_cache_dtype=kv_cache_dtype,
        max_num_batched_tokens=5,
    )
    a = prompt_logprobs(whole.generate(PROMPTS, SCORE, use_tqdm=False))
    b = prompt_logprobs(chunked.generate(PROMPTS, SCORE, use_tqdm=False))
    for ra, rb, r0 in zip(a, b, base):
        torch.testing.assert_close(torch.tensor(ra), torch.tensor(rb), atol=1e-4, rtol=0)
        diff = (torch.tensor(ra) - torch.tensor(r0)).abs()
        assert diff.max() < bound
    assert any(x != y for ra, r0 in zip(a, base) for x, y in zip(ra, r0))  # really quantized


def test_parallel_samples_share_and_copy_quantized_blocks(tiny_model_dir):
    folder = tiny_model_dir("llama")
    llm = LLM(folder, dtype="float32", kv_cache_memory=KV, kv_cache_dtype="int8")
    one = llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    two = llm.generate(
        PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=2)
    )
    expected = list(one[0].outputs[0].token_ids)
    assert [list(c.token_ids) for c in two[0].outputs] == [expected, expected]
    assert llm.engine.kv.pool.num_used_blocks == 0
