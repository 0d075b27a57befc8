"""AWQ input-channel scaling: never worse than round-to-nearest on its error measure, a real gain
where a few input channels are loud, the layer still computes x @ W^T (x / s against W * s), and
an option of weight-only formats only."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import QuantConfig
from tokenmill.layers.linear import Linear
from tokenmill.quant import quantize
from tokenmill.quant.awq import awq_scale
from tokenmill.quant.methods import make_method
from tokenmill.quant.methods.base import CalibrationStats


def output_error(w, importance, fmt, s=None):
    """sum_ij (Q(W s)_ij / s_j - W_ij)^2 E[x_j^2] in float64."""
    s = torch.ones(w.shape[1]) if s is None else s
    deq = quantize(w * s, fmt).dequantize(torch.float64) / s.double()
    return ((deq - w.double()).pow(2) * importance.double()).sum().item()


def loud_inputs(cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(cols, generator=gen) * 0.5 + 0.1
    m[torch.randperm(cols, generator=gen)[:8]] = 400.0  # a few outlier channels, as LLMs have
    return m


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp6_e3m2", "fp6_e2m3", "int4", "int8"])
def test_awq_never_loses_to_round_to_nearest(fmt):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=gen) * (1 + 4 * (torch.rand(64, 128, generator=gen) > 0.97))
    m = loud_inputs(128, seed=4)
    s = awq_scale(w, [64], m, lambda p: quantize(p, fmt))
    assert output_error(w, m, fmt, s) <= output_error(w, m, fmt) * (1 + 1e-6)


# Formats with a uniform grid inside a block gain; the power-of-two-scaled float formats (mxfp4,
# fp6_e3m2), whose error is already relative to each value, find no alpha that helps here.
@pytest.mark.parametrize("fmt", ["nvfp4", "fp6_e2m3", "int4", "int8"])
def test_awq_beats_round_to_nearest_where_some_inputs_are_loud(fmt):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=gen)
    m = loud_inputs(256)
    s = awq_scale(w, [64, 32], m, lambda p: quantize(p, fmt))
    assert s is not None and s.shape == (256,)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert s[m > 100].min() > s[m < 1].max()  # the loud channels are scaled up
    assert output_error(w, m, fmt, s) < 0.9 * output_error(w, m, fmt)


def test_awq_keeps_round_to_nearest_when_inputs_are_alike():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    assert awq_scale(w, [32], torch.ones(128), lambda p: quantize(p, "nvfp4")) is None


def test_awq_linear_computes_the_same_product():
    gen = torch.Generator().manual_seed(3)
    layer = Linear(256, [64, 32], quant_method=make_method("nvfp4", awq=True))
    w = torch.randn(96, 256, generator=gen)
    layer.weight.data.copy_(w)
    mean_square = loud_inputs(256)
    layer.quant_method.calibration = CalibrationStats(mean_square.sqrt(), mean_square)
    layer.quant_method.process_weights_after_loading(layer)
    s = layer.quant_method.input_smooth
    x = torch.randn(5, 256, generator=gen) * mean_square.sqrt()
    ref = (x.double() / s.double()) @ layer.quant_method.qweight.dequantize(torch.float64).T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-4)
    assert (layer(x) - x @ w.T).abs().mean() < 0.2 * (x @ w.T).abs().mean()  # near W x


def test_awq_is_an_option_of_weight_only_formats():
    assert QuantConfig(quantization="int4", awq=True).method_options()["awq"] is True
    for method in ("w8a8", "fp8", None):
        with pytest.raises(ValueError, match="awq applies to weight-only"):
            QuantConfig(quantization=method, awq=True)


def test_awq_with_a_diagonal_hessian_is_the_diagonal_measure():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    m = loud_inputs(256, seed=5)
    fn = lambda p: quantize(p, "nvfp4")  # noqa: E731
    a = awq_scale(w, [96], m, fn)
    b = awq_scale(w, [96], m, fn, hessian=torch.diag(m))
    assert a is not None and b is not None and torch.equal(a, b)
