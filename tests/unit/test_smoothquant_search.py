"""SmoothQuant's alpha chosen per layer: what it measures is what the layer computes, and it
never does worse than the alphas it could have taken."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import QuantConfig
from tokenmill.layers.linear import Linear
from tokenmill.quant import smoothquant as sq
from tokenmill.quant.methods import make_method
from tokenmill.quant.methods.base import CalibrationStats


def calibration(seed: int, outlier: float):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 192, generator=gen)
    x[:, 7] *= outlier  # LLM activations carry a few huge channels
    x[:, 50] *= outlier / 4
    weight = torch.randn(80, 192, generator=gen) * 0.05
    return x, weight


@pytest.mark.parametrize("zero_point", [False, True])
def test_the_searched_error_is_what_the_quantized_layer_computes(zero_point):
    x, weight = calibration(0, 60.0)
    method = make_method("w8a8", smoothquant_search=True, activation_zero_point=zero_point)
    layer = Linear(192, [80], quant_method=method)
    layer.weight.data.copy_(weight)
    method.calibration = CalibrationStats(x.abs().amax(dim=0), x.pow(2).mean(dim=0), x)
    layer.quant_method.process_weights_after_loading(layer)
    exact = x.double() @ weight.double().T
    measured = (layer(x).double() - exact).pow(2).sum() / exact.pow(2).sum()
    assert method.chosen_alpha in sq.ALPHAS and method.chosen_alpha > 0
    assert measured.item() == pytest.approx(method.chosen_error, rel=1e-3)
    assert method.calibration is None  # statistics dropped once quantized


@pytest.mark.parametrize("method", ["w8a8", "fp8"])
def test_the_chosen_alpha_is_the_best_of_the_grid_and_beats_no_smoothing(method):
    x, weight = calibration(1, 80.0)
    m = make_method(method, smoothquant_search=True)
    alpha, s, errors = sq.search_alpha(
        weight,
        x.abs().amax(dim=0),
        x,
        lambda w: m.quantize_weight(w).dequantize().double(),
        m.fake_quantize_activation,
    )
    assert set(errors) == set(sq.ALPHAS)
    assert errors[alpha] == min(errors.values())
    assert errors[alpha] < 0.5 * errors[0.0]  # the outliers no longer set every token's scale
    torch.testing.assert_close(s, sq.smoothing_scale(x.abs().amax(dim=0), weight, alpha))


def test_without_outliers_no_smoothing_can_win():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=gen)
    weight = torch.randn(64, 128, generator=gen)
    weight[:, 3] *= 50  # the weight, not the input, has the outlier column
    m = make_method("w8a8", smoothquant_search=True)
    alpha, s, errors = sq.search_alpha(
        weight,
        x.abs().amax(dim=0),
        x,
        lambda w: m.quantize_weight(w).dequantize().double(),
        m.fake_quantize_activation,
    )
    assert errors[alpha] <= errors[0.0] and errors[alpha] <= errors[0.5]


def test_the_option_is_for_activation_quantizing_methods():
    options = QuantConfig(quantization="w8a8", smoothquant_search=True).method_options()
    assert make_method("w8a8", **options).smoothquant_search is True
    with pytest.raises(ValueError, match="smoothquant_search applies to w8a8 and fp8"):
        QuantConfig(quantization="nvfp4", smoothquant_search=True)
    with pytest.raises(ValueError, match="smoothquant_search applies to w8a8 and fp8"):
        make_method("int4", smoothquant_search=True)
