"""The native nvfp4/mxfp4/fp8 weight-only CPU kernels (quant/fp4_cpu.py, layers/csrc/fp4.cpp)
against the float64 reference of the format: the dense weights bit for bit, products to fp32
rounding."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers import native
from tokenmill.layers.linear import Linear
from tokenmill.layers.native_ops import select_kernels
from tokenmill.quant import quantize
from tokenmill.quant.fp4_cpu import GEMV_ROWS, Fp4Kernels, scale_table
from tokenmill.quant.methods import make_method
from tokenmill.quant.methods.weight_only import (
    NativeRowsKernel,
    dequantize_fast,
)

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def kernels() -> Fp4Kernels:
    return Fp4Kernels()


def weight(fmt: str, rows: int = 96, cols: int = 576) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]
    w[0, :40] = 0.0  # whole zero blocks
    return w


def test_scale_tables_are_the_format_definitions():
    e4m3, e8m0 = scale_table("nvfp4"), scale_table("mxfp4")
    assert e4m3[0x7E] == 448 and e4m3[0x08] == 2**-6 and e4m3[0x01] == 2**-9
    assert torch.isnan(e4m3[0x7F]) and torch.isnan(e4m3[0xFF]) and e4m3[0x80] == 0
    assert e8m0[127] == 1 and e8m0[0] == 2.0**-127 and e8m0[254] == 2.0**127
    assert torch.isnan(e8m0[255])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, GEMV_ROWS, GEMV_ROWS + 1, 40])
def test_products_match_the_float64_reference(kernels, fmt, dtype, n):
    q = quantize(weight(fmt), fmt)
    w = kernels.prepare(q)
    assert w is not None
    x = torch.randn(n, 576, generator=torch.Generator().manual_seed(n)).to(dtype)
    # the model's weights: the format's value in fp32, rounded to the model dtype
    reference = dequantize_fast(q, dtype).double()
    assert torch.equal(reference, q.dequantize(torch.float64).to(dtype).double())
    want = x.double() @ reference.T
    got = kernels.matmul(x, w)
    assert got.dtype == dtype and got.shape == (n, 96)
    # fp32: 576 products summed in the kernel's order (AVX-512 lanes, or the scalar loop on
    # CPUs without it: 1.2e-6 measured there); a wrong code or scale is off by ~1e-2.
    tol = 3e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    scale = want.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert ((got.double() - want).abs() / scale).max() < tol


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_weights_are_exactly_the_torch_paths(kernels, fmt, dtype):
    q = quantize(weight(fmt, rows=33), fmt)
    w = kernels.prepare(q)
    dense = torch.empty(33, 576, dtype=dtype)
    row_scale = w.row_scale.data_ptr() if w.row_scale is not None else None
    args = (w.codes.data_ptr(), w.scales.data_ptr(), w.lut.data_ptr(), row_scale)
    assert (
        kernels.dequant(*args, dense.data_ptr(), 33, 576, w.block, dtype == torch.bfloat16, 2) == 0
    )
    assert torch.equal(dense, dequantize_fast(q, dtype))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dense_weights_are_exactly_the_torch_paths(kernels, fmt, dtype):
    w = weight(fmt, rows=33)
    w[1, :24] = 1e-9 * w[1, :24].sign()  # subnormal codes, and saturation below
    w[2, 0] = 1e6
    q = quantize(w, fmt)
    fw = kernels.prepare(q)
    dense = torch.empty(33, 576, dtype=dtype)
    bf16 = int(dtype == torch.bfloat16)
    args = (fw.codes.data_ptr(), fw.row_scale.data_ptr(), dense.data_ptr(), 33, 576, fw.e5m2)
    assert kernels.dequant8(*args, bf16, 2) == 0
    assert torch.equal(dense, dequantize_fast(q, dtype))
    per_tensor = quantize(w, fmt, granularity="tensor")  # one scale, expanded to the rows
    got = kernels.matmul(torch.eye(576)[:4], kernels.prepare(per_tensor))
    assert torch.equal(got, dequantize_fast(per_tensor, torch.float32)[:, :4].T)


def test_shapes_outside_the_kernels_are_declined(kernels):
    assert kernels.prepare(quantize(torch.randn(8, 64), "int4", group_size=32)) is None
    assert kernels.prepare(quantize(torch.randn(8, 48), "nvfp4")) is not None  # 3 blocks of 16
    assert kernels.prepare(quantize(torch.randn(8, 40, 32), "nvfp4")) is None  # not 2-D
    x = torch.randn(2, 576)
    assert kernels.gemv(x.data_ptr(), 9, None, None, None, None, None, 1, 576, 16, 0, 1) == 1


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_layers_take_the_kernels_only_where_cpu_kernels_allows(choice):
    layer = Linear(576, [64, 32], False, torch.bfloat16, make_method("nvfp4"))
    with torch.no_grad():
        layer.weight.copy_(weight("nvfp4", rows=96).bfloat16())
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 576).bfloat16()
    before = layer(x)  # the torch path: dequantize, then F.linear
    model = torch.nn.Sequential(layer)
    assert select_kernels(model, choice, torch.device("cpu"), torch.bfloat16) == choice.replace(
        "auto", "native"
    )
    # nvfp4 rows whose length is a multiple of 32 take csrc/gguf.cpp's kernels (and the fused
    # halves in a model), as do fp8 rows; this file's kernels serve the rest
    assert isinstance(layer.quant_method.impl, NativeRowsKernel) == (choice == "auto")
    after = layer(x)
    # the torch path multiplies the weights rounded to bf16; the native GEMV the exact ones:
    # against the float64 product, it is at least as close
    truth = x.double() @ dequantize_fast(layer.quant_method.qweight, torch.float32).double().T
    err_after, err_before = (after.double() - truth).abs(), (before.double() - truth).abs()
    assert err_after.mean() <= err_before.mean() * 1.05 + 1e-6
    assert err_after.max() <= 0.02 * truth.abs().max()
