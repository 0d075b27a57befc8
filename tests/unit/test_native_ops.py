"""The native row kernels (residual + RMSNorm, SiLU * up) against the eager torch code they
replace: fp32 within rounding, bf16 with the same roundings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers import native
from tokenmill.layers.activation import RotatedSiluAndMul, SiluAndMul
from tokenmill.layers.native_ops import RowKernels
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (both bf16); values both below 1e-30 count as
    equal (fp32 flushes exp below 1e-38 to zero where torch keeps a denormal)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    both_tiny = (a.float().abs() < 1e-30) & (b.float().abs() < 1e-30)
    return torch.where(both_tiny, 0, (ia - ib).abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (300, 576), (130, 960)])
def test_rms_norm_matches_the_eager_module(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows + hidden)
    torch_norm, native_norm = RMSNorm(hidden, 1e-5, dtype), RMSNorm(hidden, 1e-5, dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    torch_norm.weight.data.copy_(weight)
    native_norm.weight.data.copy_(weight)
    native_norm.native = RowKernels()
    scales = torch.logspace(-3, 2, rows)[:, None]
    x = (torch.randn(rows, hidden, generator=gen) * scales).to(dtype)
    r = torch.randn(rows, hidden, generator=gen).to(dtype)
    for args in ((x,), (x, r)):
        want, got = torch_norm(*args), native_norm(*args)
        if len(args) == 2:
            assert torch.equal(got[1], want[1])  # x + residual: one rounding, as torch's add
            want, got = want[0], got[0]
        assert got.dtype == dtype and got.shape == x.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        else:  # the fp32 statistic may differ in its last bits (the AVX2 path sums in another
            # order), moving a rare rounding by one or two bf16 ulps
            apart = ulps_apart(got, want)
            assert apart.max() <= 2 and (apart > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,d", [(1, 1536), (64, 1536), (5, 40)])
def test_silu_mul_matches_the_eager_module(dtype, rows, d):
    gen = torch.Generator().manual_seed(rows * d)
    x = (torch.randn(rows, 2 * d, generator=gen) * 4).to(dtype)
    x[0, :4] = torch.tensor([0.0, -100.0, 100.0, -1e-3])  # zero, saturations, tiny
    act = SiluAndMul()
    want = act(x)
    act.native = RowKernels()
    got = act(x)
    assert got.dtype == dtype and got.shape == (rows, d)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        apart = ulps_apart(got, want)
        assert apart.max() <= 1 and (apart > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,width", [(1, 12, 15), (64, 12, 15), (300, 4, 4), (9, 1, 3)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0}])
def test_rotary_is_the_eager_rotation_bit_for_bit(dtype, tokens, heads, width, scaling):
    """q and k as a column slice of the fused q/k/v output (width heads a row), any positions."""
    gen = torch.Generator().manual_seed(tokens * heads)
    qkv = (torch.randn(tokens, width, 64, generator=gen) * 3).to(dtype)
    rotary = RotaryEmbedding(64, 8192, 10000.0, scaling)
    cos_sin = rotary.lookup(torch.randint(0, 8192, (tokens,), generator=gen), dtype)
    x = qkv[:, :heads]
    want = rotary.apply(x, cos_sin)
    rotary.native = RowKernels()
    got = rotary.apply(x, cos_sin)
    assert got.dtype == dtype and got.shape == (tokens, heads, 64) and got.is_contiguous()
    assert torch.equal(got, want)  # the same products and sums, rounded where eager rounds them


def test_what_the_kernels_do_not_take_stays_on_torch():
    kernels = RowKernels()
    x = torch.randn(4, 64)
    assert kernels.rms_norm(x.half(), None, torch.ones(64).half(), 1e-6) is None
    assert kernels.rms_norm(x.t(), None, torch.ones(4), 1e-6) is None  # not contiguous
    assert kernels.rms_norm(x, x.double(), torch.ones(64), 1e-6) is None
    assert kernels.silu_mul(torch.randn(4, 64)[:, ::2]) is None
    cos = sin = torch.randn(4, 1, 64)
    assert kernels.rotary(torch.randn(4, 2, 64)[:, :, ::2], cos[..., ::2], sin[..., ::2]) is None
    assert kernels.rotary(torch.randn(4, 3, 64)[:, ::2], cos, sin) is None  # heads apart
    assert kernels.rotary(torch.randn(4, 2, 64), cos.bfloat16(), sin.bfloat16()) is None
    assert kernels.rotary(torch.randn(4, 2, 64).half(), cos.half(), sin.half()) is None
    norm = RMSNorm(64, 1e-6)
    norm.native = kernels
    q = torch.randn(3, 4, 64)[:, 1:3]  # a view of heads, as qwen3's q_norm gets
    torch.testing.assert_close(norm(q), F.rms_norm(q, (64,), norm.weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,d,block", [(1, 1536, 64), (33, 1536, 64), (4, 96, 32), (3, 512, 512)]
)
def test_silu_mul_with_hadamard_matches_the_two_steps(dtype, rows, d, block):
    from tokenmill.quant.rotation import OnlineRotation

    gen = torch.Generator().manual_seed(rows * d + block)
    x = (torch.randn(rows, 2 * d, generator=gen) * 3).to(dtype)
    rotation = OnlineRotation(d, dtype, block=block)
    assert rotation.block == block
    act = RotatedSiluAndMul(rotation)
    want = act(x)  # torch: SiLU * up, then the Hadamard GEMM
    exact = SiluAndMul()(x).double() @ rotation.dense()  # the same in float64
    act.native = RowKernels()
    got = act(x)
    assert got.dtype == dtype and got.shape == (rows, d)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        apart = ulps_apart(got, want)
        assert apart.max() <= 1
        if block in (16, 64, 256):  # 1/sqrt(block) a power of two: both round once
            assert (apart > 0).float().mean() < 0.05  # (the sums' order differs)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.01 + 1e-6
    assert RowKernels().silu_mul(x, hadamard_block=48) is None  # not a power of two


def test_fused_hadamard_is_one_op_inside_torch_compile():
    from tokenmill.quant.rotation import OnlineRotation

    rotation = OnlineRotation(256, torch.float32)
    act = RotatedSiluAndMul(rotation)
    act.native = RowKernels()
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda t: act(t * 2), fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), act(x * 2))
    exact = SiluAndMul()(x * 2).double() @ rotation.dense()
    torch.testing.assert_close(compiled(x).double(), exact, rtol=1e-5, atol=1e-5)
