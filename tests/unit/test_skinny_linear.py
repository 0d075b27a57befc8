"""The skinny linear kernel (layers/skinny.py) against a float64 product and oneDNN's GEMM over
the same packed bytes: every row count it takes, the model's shapes, bias, strided inputs, and
the layout check that keeps it off weights it cannot read."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers import native, skinny
from tokenmill.layers.linear import Linear, pack_for_cpu

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")

# (N, K) of SmolLM2-135M: fused q/k/v, o, gate/up, down, the tied head; and a 1B-class shape
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (2048, 2048)]


def kernel_or_skip(packed, weight):
    if not skinny.available(weight.dtype):
        pytest.skip(f"no skinny kernel for {weight.dtype} on this CPU")
    cols = skinny.match_block_cols(packed, weight)
    if not cols:
        pytest.skip(f"oneDNN packs {weight.dtype} {tuple(weight.shape)} in another layout here")
    return lambda x, bias=None: skinny.linear(x, packed, bias, cols)


def operands(n, k, rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-2, 1, rows)[:, None]).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return weight, x, bias


def assert_within_rounding(got, x, weight, bias):
    """|got - exact| within the output's rounding (bf16: half an ulp, plus a margin for the fp32
    sum) and the fp32 accumulation error bound sum|x||w| * K * eps."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    bound = (x.double().abs() @ weight.double().abs().T) * x.shape[-1] * 2**-24
    half_ulp = 2**-8 if got.dtype == torch.bfloat16 else 2**-24
    err = (got.double() - exact).abs()
    assert (err <= exact.abs() * half_ulp * 1.01 + bound + 1e-30).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_row_count_matches_the_exact_product(dtype, n, k):
    weight, x, bias = operands(n, k, skinny.MAX_ROWS, dtype, seed=n + k)
    packed = pack_for_cpu(weight)
    kernel = kernel_or_skip(packed, weight)
    for rows in range(1, skinny.MAX_ROWS + 1):
        for b in (None, bias):
            got = kernel(x[:rows], b)
            assert got is not None and got.shape == (rows, n) and got.dtype == dtype
            assert_within_rounding(got, x[:rows], weight, b)
            if dtype == torch.bfloat16:  # oneDNN's fp32 sums in another order, rounded to bf16:
                onednn = torch.ops.mkldnn._linear_pointwise(x[:rows], packed, b, "none", [], "")
                assert (got != onednn).float().mean() < 0.02  # equal but for rare last bits


def test_rows_it_does_not_take_are_handed_back():
    weight, x, _ = operands(576, 576, 9, torch.bfloat16, seed=1)
    kernel = kernel_or_skip(pack_for_cpu(weight), weight)
    assert kernel(x) is None  # 9 rows: oneDNN's GEMM
    assert kernel(x[:0]) is None
    assert kernel(x[:2].float()) is None  # another dtype


def test_strided_rows_and_nan_inputs():
    weight, x, bias = operands(960, 576, 3, torch.bfloat16, seed=2)
    kernel = kernel_or_skip(pack_for_cpu(weight), weight)
    wide = torch.zeros(3, 1024, dtype=torch.bfloat16)
    wide[:, 100:676] = x
    got = kernel(wide[:, 100:676], bias)  # row stride 1024, not K
    assert got is not None
    assert_within_rounding(got, x, weight, bias)
    x[1, 7] = float("nan")
    got = kernel(x, bias)
    assert got is not None and got[1].isnan().all() and not got[[0, 2]].isnan().any()


def test_the_layout_check_refuses_what_the_kernel_cannot_read():
    weight, _, _ = operands(960, 576, 1, torch.bfloat16, seed=3)
    packed = pack_for_cpu(weight)
    kernel_or_skip(packed, weight)
    other = weight.clone()
    other[5, 9] += 1
    assert skinny.match_block_cols(packed, other) == 0  # not these bytes: no kernel
    odd = operands(100, 72, 1, torch.bfloat16, seed=4)[0]  # padded by oneDNN
    assert skinny.match_block_cols(pack_for_cpu(odd), odd) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(960, 576), (100, 72)])
def test_a_linear_layer_uses_it_for_decode_and_onednn_for_prefill(dtype, n, k):
    weight, x, bias = operands(n, k, 33, dtype, seed=5)
    layer = Linear(k, [n], bias=True, params_dtype=dtype)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    layer.quant_method.process_weights_after_loading(layer)
    attached = layer.quant_method.attach_native(layer)
    if n == 100:
        assert not attached  # padded by oneDNN: GEMM for every size
    for rows in (1, 4, 8, 9, 33):
        got = layer(x[:rows])
        assert_within_rounding(got, x[:rows], weight, bias)


def plain_linear(k, n, dtype, gen, bias=False):
    layer = Linear(k, [n], bias=bias, params_dtype=dtype)
    layer.weight.data.copy_((torch.randn(n, k, generator=gen) / k**0.5).to(dtype))
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen).to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    layer.quant_method.attach_native(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_mlp_block_is_the_layers_bit_for_bit(dtype, bias):
    """fused_decode.MLPBlock against o_proj, residual + RMSNorm, gate_up, SiLU * up and down
    called one by one (the same kernels, so the same bits), for every row count it takes."""
    from tokenmill.layers.activation import SiluAndMul
    from tokenmill.layers.fused_decode import MLPBlock
    from tokenmill.layers.native_ops import RowKernels
    from tokenmill.layers.norm import RMSNorm

    if not skinny.available(dtype):
        pytest.skip(f"no skinny kernel for {dtype} on this CPU")
    gen = torch.Generator().manual_seed(7)
    hidden, inter, q = 576, 1536, 640
    o_proj = plain_linear(q, hidden, dtype, gen, bias)
    gate_up = plain_linear(hidden, 2 * inter, dtype, gen, bias)
    down = plain_linear(inter, hidden, dtype, gen, bias)
    norm = RMSNorm(hidden, 1e-5, dtype)
    norm.weight.data.copy_((1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype))
    norm.native = act_native = RowKernels()
    act = SiluAndMul()
    act.native = act_native
    block = MLPBlock.build(o_proj, norm, gate_up, down, act)
    assert block is not None
    for rows in range(1, skinny.MAX_ROWS + 1):
        o = torch.randn(rows, q, generator=gen).to(dtype)
        residual = (4 * torch.randn(rows, hidden, generator=gen)).to(dtype)
        x, summed = norm(o_proj(o), residual)
        want = down(act(gate_up(x)))
        got = block(o, residual)
        assert got is not None
        assert torch.equal(got[1], summed) and torch.equal(got[0], want), rows
    assert block(torch.randn(9, q).to(dtype), torch.randn(9, hidden).to(dtype)) is None
    unread = plain_linear(inter, hidden, dtype, gen)
    unread.quant_method.block_cols = 0  # a layout the skinny kernel does not read: no block
    assert MLPBlock.build(o_proj, norm, gate_up, unread, act) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("first_layer", [False, True])
def test_the_fused_qkv_block_is_the_layers_bit_for_bit(dtype, first_layer):
    """fused_decode.QKVBlock against residual + RMSNorm, qkv_proj and rotary called one by one
    (models/llama.DecoderLayer.attention_inputs without fusion), for every row count."""
    from types import SimpleNamespace

    from tokenmill.layers.fused_decode import QKVBlock
    from tokenmill.layers.native_ops import RowKernels
    from tokenmill.layers.norm import RMSNorm
    from tokenmill.layers.rotary import RotaryEmbedding

    if not skinny.available(dtype):
        pytest.skip(f"no skinny kernel for {dtype} on this CPU")
    gen = torch.Generator().manual_seed(11)
    hidden, heads, kv_heads, d = 576, 9, 3, 64
    qkv = plain_linear(hidden, (heads + 2 * kv_heads) * d, dtype, gen)
    norm = RMSNorm(hidden, 1e-5, dtype)
    norm.weight.data.copy_((1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype))
    rotary = RotaryEmbedding(d, 4096, 10000.0, None)
    norm.native = rotary.native = RowKernels()
    attn = SimpleNamespace(q_norm=None, num_heads=heads, num_kv_heads=kv_heads, head_dim=d)
    block = QKVBlock.build(norm, qkv, rotary, attn)
    assert block is not None
    for rows in range(1, skinny.MAX_ROWS + 1):
        x = torch.randn(rows, hidden, generator=gen).to(dtype)
        residual = None if first_layer else (4 * torch.randn(rows, hidden, generator=gen)).to(dtype)  # fmt: skip
        cos_sin = rotary.lookup(torch.randint(0, 4096, (rows,), generator=gen), dtype)
        if residual is None:
            want_res, normed = x, norm(x)
        else:
            normed, want_res = norm(x, residual)
        out = qkv(normed).view(rows, heads + 2 * kv_heads, d)
        qk = rotary.apply(out[:, : heads + kv_heads], cos_sin)
        got = block(cos_sin, x, residual)
        assert got is not None
        q, k, v, res = got
        assert torch.equal(q, qk[:, :heads]) and torch.equal(k, qk[:, heads:]), rows
        assert torch.equal(v, out[:, heads + kv_heads :]) and torch.equal(res, want_res)
    attn.q_norm = norm  # Qwen3's q/k norms: not this block's
    assert QKVBlock.build(norm, qkv, rotary, attn) is None
