"""The native CPU paged decode kernel against a float64 reference, and how engines pick it."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.layers import native, native_ops
from tokenmill.layers.attention import AttentionMetadata, TorchAttention
from tokenmill.layers.cpu_attention import NativeCpuAttention
from tokenmill.layers.kv_quant import QuantizedKVAttention

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


def paged_case(lens, heads, kv_heads, dim, block_size, dtype, gen):
    """A pool whose every slot outside the sequences' keys holds NaN, random block tables."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 5
    slots = (num_blocks + 1) * block_size
    kv = torch.full((2, kv_heads, slots, dim), float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need)
    tables = torch.full((len(lens), max_blocks), num_blocks, dtype=torch.int64)  # pad block
    keys = []
    used = 0
    for row, (n, b) in enumerate(zip(lens, need)):
        tables[row, :b] = perm[used : used + b]
        used += b
        pos = torch.arange(n)
        where = tables[row, pos // block_size] * block_size + pos % block_size
        kv_seq = torch.randn(2, kv_heads, n, dim, generator=gen) * 2
        kv[:, :, where] = kv_seq
        keys.append(kv_seq.double())
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        num_decode_tokens=len(lens),
        block_size=block_size,
        decode_block_tables=tables,
        decode_mask=None,
        decode_lens=torch.tensor(lens, dtype=torch.int32),
    )
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q.to(dtype), kv.to(dtype), meta, keys


def float64_attention(q, keys, scale):
    out = []
    for row, kv in enumerate(keys):  # kv [2, kv_heads, n, dim]
        k = kv[0].repeat_interleave(q.shape[1] // kv.shape[1], 0)  # [heads, n, dim]
        v = kv[1].repeat_interleave(q.shape[1] // kv.shape[1], 0)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[row].double(), k) * scale, -1)
        out.append(torch.einsum("hn,hnd->hd", w, v))
    return torch.stack(out)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size",
    [
        (9, 3, 64, 16),  # the default model: sums in registers (AVX-512)
        (8, 8, 128, 16),  # no GQA, head_dim 128: registers
        (32, 8, 128, 16),  # Llama-3-8B's shape: too many sums for registers, AVX-512 in memory
        (16, 2, 64, 16),  # a group of 8: in memory
        (12, 3, 80, 8),  # head_dim not a multiple of 16: the portable path
        (4, 1, 16, 32),
        (6, 2, 64, 1),
    ],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_decode_matches_float64_and_reads_only_real_keys(
    heads, kv_heads, dim, block_size, dtype, tol
):
    gen = torch.Generator().manual_seed(heads * dim + block_size)
    # lengths: one key, a full block, one past it, and long ones
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 150, 97]
    q, kv, meta, keys = paged_case(lens, heads, kv_heads, dim, block_size, dtype, gen)
    scale = dim**-0.5
    out = NativeCpuAttention(scale)._decode(q, kv, meta)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()  # never read a NaN slot: no padding, no foreign block
    ref = float64_attention(q, [k.to(dtype).double() for k in keys], scale)
    err = (out.double() - ref).abs().max().item()
    assert err < tol * ref.abs().max().item()


def test_decode_equals_the_torch_backend_on_a_zeroed_pool():
    gen = torch.Generator().manual_seed(0)
    q, kv, meta, _ = paged_case([5, 40, 17, 64], 9, 3, 64, 16, torch.float32, gen)
    kv = torch.nan_to_num(kv, nan=0.0)  # the torch backend reads padding (masked): keep it finite
    lens = meta.decode_lens.tolist()
    width = meta.decode_block_tables.shape[1] * 16
    mask = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    meta = AttentionMetadata(**{**meta.__dict__, "decode_mask": mask})
    torch.testing.assert_close(
        NativeCpuAttention(0.125)._decode(q, kv, meta),
        TorchAttention(0.125)._decode(q, kv, meta),
        rtol=1e-5,
        atol=1e-6,
    )


def test_engines_pick_the_backend_and_agree(tiny_model_dir):
    folder = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 19, 33)]
    runs = {}
    for choice in ("native", "torch"):
        llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 22, cpu_kernels=choice)
        assert llm.engine.runner.cpu_kernels == choice
        runs[choice] = [
            o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
        ]
    assert runs["native"] == runs["torch"]
    auto = LLM(folder, dtype="float32", kv_cache_memory=1 << 22)
    assert auto.engine.runner.cpu_kernels == "native"
    for choice in ("auto", "native"):  # a quantized cache keeps its attention, norms go native
        quantized = LLM(
            folder,
            dtype="float32",
            kv_cache_memory=1 << 22,
            kv_cache_dtype="int8",
            cpu_kernels=choice,
        )
        layer = quantized.engine.loaded.model.model.layers[0]
        assert type(layer.self_attn.backend) is QuantizedKVAttention
        assert layer.input_layernorm.native is not None and layer.mlp.act.native is not None
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        LLM(folder, cpu_kernels="flash")


def test_without_a_compiler_auto_falls_back_and_native_says_why(
    tiny_model_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: None)
    native.load.cache_clear()
    try:
        folder = tiny_model_dir("llama")
        llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 22)
        assert llm.engine.runner.cpu_kernels == "torch"
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            LLM(folder, dtype="float32", kv_cache_memory=1 << 22, cpu_kernels="native")
        with pytest.raises(RuntimeError, match="not available"):
            native_ops.select_kernels(
                torch.nn.Module(), "native", torch.device("cpu"), torch.float16
            )
    finally:
        native.load.cache_clear()


def test_the_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    try:
        native.load("paged_attention")
        built = list((tmp_path / "tokenmill" / "kernels").glob("paged_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.load.cache_clear()
        native.load("paged_attention")  # a second process would find the same file
        assert [
            p.stat().st_mtime_ns for p in (tmp_path / "tokenmill" / "kernels").glob("*.so")
        ] == [stamp]
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_equals_the_torch_backend_and_rejects_stray_slots(dtype):
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(37, 9 + 2 * 3, 64, generator=gen).to(dtype)  # fused projection, strided views
    q, k, v = qkv.split([9, 3, 3], dim=1)
    k = k.contiguous()  # rotary's output; v stays a strided view
    slots = torch.randperm(300, generator=gen)[:37]
    ours, theirs = torch.zeros(2, 3, 320, 64, dtype=dtype), torch.zeros(2, 3, 320, 64, dtype=dtype)
    NativeCpuAttention(0.125).write(ours, slots, k, v)
    TorchAttention(0.125).write(theirs, slots, k, v)
    assert torch.equal(ours, theirs) and ours.any()
    with pytest.raises(IndexError, match="outside"):
        NativeCpuAttention(0.125).write(ours, torch.tensor([3, 320]), k[:2], v[:2])


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")  # a cache path below a file: mkdir fails, even for root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native.load.cache_clear()
    try:
        native.load("paged_attention")
        assert list((tmp_path / "tmp" / "tokenmill-kernels").glob("paged_attention-*.so"))
    finally:
        native.load.cache_clear()


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-fno-such-flag-exists"))
    native.load.cache_clear()
    try:
        with pytest.raises(native.NativeUnavailable, match="building paged_attention.cpp failed"):
            native.load("paged_attention")
        assert not list((tmp_path / "tokenmill" / "kernels").glob("*.so"))  # no half-built file
    finally:
        native.load.cache_clear()
