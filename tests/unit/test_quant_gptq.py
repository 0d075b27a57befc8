"""GPTQ keeps the format's scales and lowers the layer's output error on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quant import FORMATS, quantize
from tokenmill.quant.formats import encode_with
from tokenmill.quant.gptq import gptq


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_with_own_values_is_the_identity(fmt):
    q = quantize(torch.randn(32, 256) * 3, fmt)
    assert torch.equal(as_bytes(encode_with(q, q.dequantize()).data), as_bytes(q.data))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp6_e3m2", "mxfp4", "nvfp4"])
def test_gptq_beats_round_to_nearest_on_outputs(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=gen)
    x = torch.randn(2048, 256, generator=gen) @ torch.randn(256, 256, generator=gen) * 0.2
    x[:, 7] *= 10  # correlated inputs with an outlier channel, as in LLMs
    h = 2 * x.T @ x / x.shape[0]
    rtn = quantize(w, fmt)
    q = gptq(w, h, rtn)
    assert torch.equal(
        q.scale.view(torch.uint8) if q.scale.dtype != torch.float32 else q.scale,
        rtn.scale.view(torch.uint8) if rtn.scale.dtype != torch.float32 else rtn.scale,
    )
    ref = x @ w.T
    err = lambda t: ((x @ t.dequantize().T) - ref).norm() / ref.norm()  # noqa: E731
    assert err(q) < 0.9 * err(rtn)


@pytest.mark.parametrize("fmt", ["int4", "fp6_e2m3", "nvfp4"])
def test_act_order_quantizes_loud_inputs_first_and_puts_columns_back(fmt):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    x = torch.randn(2048, 256, generator=gen) @ torch.randn(256, 256, generator=gen) * 0.2
    x[:, torch.randperm(256, generator=gen)[:12]] *= 8  # loud channels scattered over the row
    h = 2 * x.T @ x / x.shape[0]
    rtn = quantize(w, fmt)
    ordered, plain = gptq(w, h, rtn), gptq(w, h, rtn, act_order=False)
    ref = x @ w.T
    err = lambda t: ((x @ t.dequantize().T) - ref).norm() / ref.norm()  # noqa: E731
    assert err(ordered) < err(plain) < err(rtn)
    # columns are back in place: with a diagonal Hessian (uncorrelated inputs, a shuffled
    # order of loudness) no error propagates, so each column is just rounded
    diag = torch.diag(torch.rand(256, generator=gen) + 0.5)
    assert torch.equal(as_bytes(gptq(w, diag, rtn).data), as_bytes(rtn.data))
