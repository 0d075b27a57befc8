"""RMSNorm against transformers' formula: bit-identical in fp32 (the fused path), the same
rounding in bf16, and within fp32 rounding of a float64 reference."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.norm import RMSNorm


def hf_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rmsnorm_equals_transformers_formula(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5, dtype)
    norm.weight.data.copy_(torch.randn(576, generator=gen))
    x = (torch.randn(rows, 576, generator=gen) * torch.logspace(-3, 2, rows)[:, None]).to(dtype)
    r = torch.randn(rows, 576, generator=gen).to(dtype)
    assert torch.equal(norm(x), hf_formula(x, norm.weight, 1e-5))
    y, summed = norm(x, r)
    assert torch.equal(summed, x + r) and torch.equal(y, hf_formula(x + r, norm.weight, 1e-5))
    if dtype == torch.float32:
        x64 = x.double()
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
        assert ((norm(x).double() - ref).abs() / ref.abs().amax(-1, keepdim=True)).max() < 1e-6
