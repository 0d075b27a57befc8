"""layers/decode_layers.py: a decode step's decoder layers as one native call, against the
layers called one by one from Python on the same weights, KV cache and metadata (the same bits
out, the same rows written), for plain fp32/bf16 weights, GGUF codes and int8 rows, at 1 to 8
rows; and every step it does not apply to left to the layers."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_gguf_codes import tiny_gguf  # noqa: F401  (a fixture)
from tokenmill import LLM, SamplingParams
from tokenmill.config import QuantConfig
from tokenmill.layers.attention import AttentionBackend, SequenceSlice
from tokenmill.layers.decode_layers import DecodeLayers
from tokenmill.layers.native_ops import select_kernels
from tokenmill.models.loader import load_model

CPU = torch.device("cpu")
BLOCK = 4


def loaded(path: str, dtype: torch.dtype, quantization: str | None = None):
    quant = QuantConfig(quantization=quantization) if quantization else None
    kw = {"quant": quant} if quant else {}
    model = load_model(path, dtype=str(dtype).removeprefix("torch."), device="cpu", **kw).model
    select_kernels(model, "native", CPU, dtype)
    return model


def step_inputs(model, rows: int, dtype: torch.dtype, seed: int, prefill: int = 0):
    """Random KV caches and a decode step of `rows` sequences of different lengths (each its
    own blocks, in shuffled order), plus `prefill` tokens of one more sequence."""
    gen = torch.Generator().manual_seed(seed)
    arch = model.arch
    num_blocks = 64
    shape = (2, arch.num_kv_heads, num_blocks * BLOCK, arch.head_dim)
    caches = [torch.randn(shape, generator=gen).to(dtype) for _ in model.model.layers]
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0: the pad block
    seqs, used = [], 0
    for i in range(rows + (1 if prefill else 0)):
        computed = int(torch.randint(0, 20, (1,), generator=gen))
        new = prefill if i == rows else 1
        blocks = -(-(computed + new) // BLOCK)
        seqs.append(SequenceSlice(order[used : used + blocks].tolist(), computed, new))
        used += blocks
    meta = AttentionBackend.prepare_metadata(seqs, BLOCK, 0, CPU)
    tokens = rows + prefill
    ids = torch.randint(0, arch.vocab_size, (tokens,), generator=gen)
    positions = torch.tensor(
        [s.num_computed_tokens + j for s in seqs for j in range(s.num_new_tokens)]
    )
    return ids, positions, caches, meta


def forward_both(model, rows, dtype, seed, prefill=0):
    """(looped hidden, looped caches, layer-by-layer hidden, its caches, whether the loop ran)."""
    ids, positions, caches, meta = step_inputs(model, rows, dtype, seed, prefill)
    mine = [c.clone() for c in caches]
    loop = model.decode_layers
    x = model.model.embed_tokens(ids)
    ran = loop(x, model.model.rotary.lookup(positions, dtype), mine, meta) is not None
    mine = [c.clone() for c in caches]
    got = model(ids, positions, mine, meta)
    model.decode_layers = None
    try:
        want = model(ids, positions, caches, meta)
    finally:
        model.decode_layers = loop
    return got, mine, want, caches, ran


def assert_loop_equals_layers(model, dtype) -> None:
    assert isinstance(model.decode_layers, DecodeLayers)
    for rows in (1, 3, 8):
        got, got_kv, want, want_kv, ran = forward_both(model, rows, dtype, seed=rows)
        assert ran, f"the loop stepped aside at {rows} rows"
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_kv, want_kv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_weights_one_call_is_the_layers_bit_for_bit(tiny_model_dir, dtype):
    model = loaded(str(tiny_model_dir("llama")), dtype)
    assert_loop_equals_layers(model, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_codes_one_call_is_the_layers_bit_for_bit(tiny_gguf, dtype):  # noqa: F811
    model = loaded(str(tiny_gguf), dtype, "gguf")
    assert_loop_equals_layers(model, dtype)


def test_int8_rows_one_call_is_the_layers_bit_for_bit(tiny_model_dir):
    model = loaded(str(tiny_model_dir("llama")), torch.bfloat16, "int8")
    assert_loop_equals_layers(model, torch.bfloat16)


def test_steps_it_does_not_take_run_the_layers(tiny_model_dir):
    """A step with a prefill, more rows than the kernels take, a layer whose halves stepped
    aside or went to torch.compile: the layers run one by one (and give the same output)."""
    model = loaded(str(tiny_model_dir("llama")), torch.float32)
    for rows, prefill in ((2, 5), (9, 0)):
        got, got_kv, want, want_kv, ran = forward_both(model, rows, torch.float32, 0, prefill)
        assert not ran
        assert torch.equal(got, want)
    layer = model.model.layers[1]
    saved = layer.fused_outputs
    layer.fused_outputs = None
    assert not forward_both(model, 1, torch.float32, 0)[-1]
    layer.fused_outputs = saved
    layer.attention_inputs = layer.attention_inputs  # what compile_with does: an own attribute
    assert not forward_both(model, 1, torch.float32, 0)[-1]
    del layer.attention_inputs
    assert forward_both(model, 1, torch.float32, 0)[-1]


def test_built_only_where_every_layer_is_fused_and_native(tiny_model_dir):
    """q/k norm (qwen3: no fused input half), torch kernels, a quantized KV cache: no loop."""
    path = str(tiny_model_dir("qwen3"))
    assert loaded(path, torch.float32).decode_layers is None
    llama = str(tiny_model_dir("llama"))
    for kw in ({"cpu_kernels": "torch"}, {"kv_cache_dtype": "int8"}):
        llm = LLM(llama, dtype="float32", max_model_len=128, kv_cache_memory=8 << 20, **kw)
        assert llm.engine.runner.model.decode_layers is None, kw


def test_a_slot_outside_the_pool_is_an_error_not_a_write(tiny_model_dir):
    model = loaded(str(tiny_model_dir("llama")), torch.float32)
    ids, positions, caches, meta = step_inputs(model, 2, torch.float32, 3)
    meta.slot_mapping[1] = caches[0].shape[2] + 7
    before = [c.clone() for c in caches]
    x = model.model.embed_tokens(ids)
    with pytest.raises(IndexError, match="KV slot outside"):
        model.decode_layers(x, model.model.rotary.lookup(positions, torch.float32), caches, meta)
    # the good row of layer 0 was written, nothing else anywhere
    assert all(torch.equal(a, b) for a, b in zip(caches[1:], before[1:]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_decodes_the_same_tokens_and_logprobs(tiny_model_dir, dtype):
    """Greedy and seeded sampling (n=2) through the engine, batches of 5 and 6 rows: with the loop
    and without, the same tokens and the same logprobs (the same bits). No prefix caching: the
    second run would otherwise prefill less (its prompts cached), which changes rounding."""
    llm = LLM(str(tiny_model_dir("llama")), dtype=dtype, max_model_len=256,
              kv_cache_memory=16 << 20, block_size=BLOCK, enable_prefix_caching=False)  # fmt: skip
    model = llm.engine.runner.model
    assert model.decode_layers is not None
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 1 for j in range(5 + 4 * i)]} for i in range(5)]  # fmt: skip
    params = [  # (prompts, params): 5 rows, then 3 x n=2 = 6 rows (8 at most take the loop)
        (prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)),
        (prompts[:3], SamplingParams(max_tokens=10, temperature=0.9, seed=5, n=2, ignore_eos=True, logprobs=1)),
    ]  # fmt: skip
    loop, taken = model.decode_layers, []

    def counted(*args):
        out = loop(*args)
        taken.append(out is not None)
        return out

    runs = []
    for loop_or_none in (counted, None):
        model.decode_layers = loop_or_none
        outs = []
        for batch, p in params:
            for got in llm.generate(batch, p, use_tqdm=False):
                outs += [(c.token_ids, c.logprobs) for c in got.outputs]
        runs.append(outs)
    assert sum(taken) >= 18  # the loop ran the decode-only steps (9 of each batch)
    assert runs[0] == runs[1]


def test_w8a8_rows_one_call_is_the_layers_bit_for_bit(tiny_model_dir):
    """w8a8 (smoothed, x quantized per row inside the GEMV) through the fused halves and the
    loop."""
    from tokenmill.quant.methods.w8a8 import NativeW8A8Kernel

    model = loaded(str(tiny_model_dir("llama")), torch.bfloat16, "w8a8")
    down = model.model.layers[0].mlp.down_proj.quant_method
    assert isinstance(down.impl, NativeW8A8Kernel) and down.smooth_inv is not None
    assert_loop_equals_layers(model, torch.bfloat16)
