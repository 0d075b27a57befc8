"""Quant methods on one linear layer against a float64 reference of what they compute."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import QUANTIZATIONS
from tokenmill.layers.linear import Linear
from tokenmill.quant import elements as el
from tokenmill.quant import quantize
from tokenmill.quant.formats import cat_rows
from tokenmill.quant.methods import METHODS, make_method
from tokenmill.quant.methods.base import CalibrationStats
from tokenmill.quant.methods.weight_only import int4_group
from tokenmill.quant.scaled_mm import scaled_mm_form
from tokenmill.quant.smoothquant import smoothing_scale

WEIGHT_ONLY = [m for m in METHODS if m not in ("w8a8", "fp8", "gguf")]  # gguf: its own tests
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the output's scale
# CUDA runs its own kernels (Triton, _int_mm, _scaled_mm) against the same references
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_layer(
    method: str, dtype: torch.dtype, device: str = "cpu", **options
) -> tuple[Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(256, [96, 160], bias=True, params_dtype=dtype)
    layer.quant_method = make_method(method, **options)
    weight = torch.randn(256, 256, generator=gen) * torch.linspace(0.1, 3, 256)[:, None]
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(torch.randn(256, generator=gen))
    layer.to(device)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, weight


def inputs(dtype: torch.dtype, rows: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 256, generator=gen) * torch.logspace(-2, 1, rows)[:, None]
    return x.to(dtype)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    y, ref = y.cpu(), ref.cpu()
    err = (y.double() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)
    assert err.max() < TOL[dtype], err.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", WEIGHT_ONLY)
def test_weight_only_matches_dequantized_float64_matmul(method, dtype, device):
    layer, weight = make_layer(method, dtype, device)
    # each checkpoint shard quantized on its own (q/k/v, gate/up), as `tokenmill quantize` does
    kw = {"group_size": int4_group(256)} if method == "int4" else {}
    shards = [quantize(w.to(dtype), method, **kw) for w in weight.split([96, 160])]
    expected = cat_rows(shards)
    assert torch.equal(layer.quant_method.qweight.scale.cpu(), expected.scale)
    x = inputs(dtype)
    ref = x.double() @ expected.dequantize(torch.float64).T + layer.bias.double().cpu()
    assert_close(layer(x.to(device)), ref, dtype)
    assert not hasattr(layer, "weight")  # the float weight is gone: memory is really saved
    if device == "cuda":
        assert layer.quant_method.kernel == "triton dequant-matmul"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matches_reference(dtype, device):
    layer, _ = make_layer("w8a8", dtype, device)
    x = inputs(dtype).to(device)
    x64 = x.double()
    amax = x64.abs().amax(dim=1, keepdim=True)
    xq = torch.round(x64 * 127 / amax)  # dynamic per-token int8
    wq = layer.quant_method.qweight.data.double()
    ref = (xq @ wq.T) * (
        amax / 127
    ) * layer.quant_method.qweight.scale.double() + layer.bias.double()
    assert_close(layer(x), ref, dtype)
    assert layer.quant_method.impl.weight_t.dtype == torch.int8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_with_activation_zero_points_matches_reference(dtype, device):
    layer, _ = make_layer("w8a8", dtype, device, activation_zero_point=True)
    wq = layer.quant_method.qweight.data.double().cpu()
    skewed = torch.nn.functional.silu(inputs(dtype).float() * 3).to(dtype)  # as SiLU * up
    for x in (inputs(dtype), skewed):
        x64 = x.double()
        lo, hi = x64.amin(1, keepdim=True).clamp(max=0), x64.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255  # x ~ scale * (q - zero), q in [-128, 127]
        zero = torch.round(-lo / scale) - 128
        xq = (torch.round(x64 / scale) + zero).clamp(-128, 127) - zero
        wscale = layer.quant_method.qweight.scale.double().cpu()
        ref = (xq @ wq.T) * scale * wscale + layer.bias.double().cpu()
        assert_close(layer(x.to(device)), ref, dtype)
    amax = x64.abs().amax(1, keepdim=True)  # on skewed rows the zero point halves the error
    symmetric = (torch.round(x64 * 127 / amax) @ wq.T) * (amax / 127)
    exact = x64 @ wq.T
    assert ((xq @ wq.T) * scale - exact).norm() < 0.7 * (symmetric - exact).norm()


def fp8_reference(x64: torch.Tensor, scale: torch.Tensor, layer, weight) -> torch.Tensor:
    """E4M3 activations (RNE, saturating) times E4M3 weights, exact products, float64 sums."""
    xv = el.decode(el.encode(x64 / scale, el.E4M3), el.E4M3, torch.float64)
    q = quantize(weight.to(layer.params_dtype), "fp8_e4m3")  # per row: shards change nothing
    assert torch.equal(q.scale, layer.quant_method.qweight.scale.cpu())
    wv = q.data.double()
    return (xv @ wv.T) * scale * q.scale.double() + layer.bias.double().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_current_scaling_matches_reference(dtype, device):
    layer, weight = make_layer("fp8", dtype, device)
    x = inputs(dtype)
    scale = x.double().abs().amax(dim=1, keepdim=True) / 448
    ref = fp8_reference(x.double(), scale.float().double(), layer, weight)
    y = layer(x.to(device))
    if device == "cuda":
        # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (measured on an H100:
        # 3e-4 relative at K = 256, with fp32 output), and _scaled_mm may only write bf16
        out_dtype, _ = scaled_mm_form(y.device, dtype)
        tol = TOL[torch.bfloat16] if out_dtype == torch.bfloat16 else 1e-3
        err = (y.double().cpu() - ref).abs() / ref.abs().amax(dim=1, keepdim=True)
        assert err.max() < tol, err.max()
        return
    assert_close(y, ref, dtype)


def test_fp8_delayed_scaling_uses_history_and_saturates():
    layer, w = make_layer("fp8", torch.float32, activation_scaling="delayed", amax_history_len=2)
    x = inputs(torch.float32)
    layer(x)  # first step: no history, the current amax
    big = x * 4  # the next step is louder than the history: values past it saturate
    scale = (x.abs().amax() / 448).double()
    y = layer(big)
    assert_close(y, fp8_reference(big.double(), scale, layer, w), torch.float32)
    layer(x)  # history now [amax(x), 4 amax(x)]: the scale follows the larger one
    scale = (big.abs().amax() / 448).double()
    assert_close(layer(x), fp8_reference(x.double(), scale, layer, w), torch.float32)


def test_names_agree_and_errors():
    assert QUANTIZATIONS == METHODS
    with pytest.raises(ValueError, match="unknown quantization"):
        make_method("int3")
    with pytest.raises(ValueError, match="activation_scaling"):
        make_method("fp8", activation_scaling="sometimes")


def test_int4_group_follows_the_row_length():
    layer = Linear(576, [64], params_dtype=torch.bfloat16)
    layer.quant_method = make_method("int4")
    layer.weight.data.normal_()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.qweight.group_size == 64  # 128 does not divide 576


def test_smoothquant_moves_outliers_and_keeps_the_product():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 256, generator=gen)
    x[:, 5] *= 80  # an outlier channel, as LLM activations have
    weight = torch.randn(96, 256, generator=gen)
    exact = x.double() @ weight.double().T

    def quantized(with_amax: bool) -> tuple[Linear, torch.Tensor]:
        layer = Linear(256, [96], quant_method=make_method("w8a8"))
        layer.weight.data.copy_(weight)
        if with_amax:
            stats = CalibrationStats(x.abs().amax(dim=0), x.pow(2).mean(dim=0))
            layer.quant_method.calibration = stats
        layer.quant_method.process_weights_after_loading(layer)
        return layer, layer(x).double()

    smoothed, y = quantized(True)
    s = smoothing_scale(x.abs().amax(dim=0), weight, 0.5)
    assert torch.equal(smoothed.quant_method.smooth_inv, 1 / s)
    xs = x.double() / s.double()  # the reference: per-token int8 of x / s, per-channel of W * s
    amax = xs.abs().amax(dim=1, keepdim=True)
    q = quantize(weight.float() * s, "int8")
    ref = (torch.round(xs * 127 / amax) @ q.data.double().T) * (amax / 127) * q.scale.double()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    _, plain = quantized(False)
    assert (y - exact).norm() < 0.5 * (plain - exact).norm()  # the outlier no longer dominates


def test_activation_zero_point_is_a_w8a8_option():
    from tokenmill.config import QuantConfig

    options = QuantConfig(quantization="w8a8", activation_zero_point=True).method_options()
    assert make_method("w8a8", **options).activation_zero_point is True
    with pytest.raises(ValueError, match="activation_zero_point applies to w8a8"):
        QuantConfig(quantization="fp8", activation_zero_point=True)
