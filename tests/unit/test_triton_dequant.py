"""The Triton dequantize-and-multiply kernel against the float64 reference of every format.

Compiled on a GPU; on CPU through Triton's interpreter (`TRITON_INTERPRET=1`), which runs the
same kernel code with numpy. The interpreter has no bfloat16 arithmetic, so bf16 is checked on
GPUs only; float16 exercises the same low-precision path everywhere."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
pytest.importorskip("triton")

from tokenmill.quant import quantize  # noqa: E402
from tokenmill.quant.formats import FORMATS  # noqa: E402
from tokenmill.quant.methods.weight_only import dequantize_fast  # noqa: E402
from tokenmill.quant.triton_dequant import (  # noqa: E402
    TritonWeight,
    choose_path,
    dequant_matmul,
    dequantize,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # x rounding included
VARIANTS = [(f, {}) for f in FORMATS] + [
    ("int4", {"group_size": 32, "symmetric": True}),
    ("int4", {"group_size": 64}),
    ("int8", {"granularity": "tensor"}),
]


def weight(rows: int = 80, cols: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 0.6, rows)[:, None]
    w[3, 5] = 40.0  # an outlier: its block's scale must carry it
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,options", VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "path,m,split_k",
    [("gemv", 1, None), ("gemv", 3, 2), ("dot", 1, None), ("dot", 5, 3), ("dot", 40, 1),
     ("dequant", 5, None)],
)  # fmt: skip
def test_kernel_equals_float64_matmul_on_dequantized_weight(fmt, options, dtype, path, m, split_k):
    q = quantize(weight(), fmt, **options)
    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 256, generator=gen) * 3).to(dtype)
    tw = TritonWeight.from_quantized(q.to(DEVICE))
    y = dequant_matmul(x.to(DEVICE), tw, path=path, split_k=split_k).cpu()
    assert y.dtype == dtype and y.shape == (m, 80)
    ref = x.double() @ q.dequantize(torch.float64).T
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < TOL[dtype], err
    assert tw.nbytes == q.nbytes  # the kernel's layout stores nothing more than the format


def test_dequantize_kernel_is_the_formats_dequantize():
    for fmt, options in VARIANTS:
        q = quantize(weight(), fmt, **options)
        w = dequantize(TritonWeight.from_quantized(q.to(DEVICE)), torch.float32).cpu()
        assert torch.equal(w, dequantize_fast(q, torch.float32)), fmt  # the same fp32 products


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the choice is measured")
def test_path_choice_without_a_gpu_follows_the_rows():
    tw = TritonWeight.from_quantized(quantize(weight(16, 64), "int4", group_size=32))
    rows = {m: choose_path(torch.ones(m, 64), tw) for m in (1, 4, 5, 256, 257)}
    assert rows == {1: "gemv", 4: "gemv", 5: "dot", 256: "dot", 257: "dequant"}


def test_bad_paths_are_clear_errors():
    tw = TritonWeight.from_quantized(quantize(weight(16, 64), "nvfp4").to(DEVICE))
    with pytest.raises(ValueError, match="path must be one of"):
        dequant_matmul(torch.ones(2, 64, device=DEVICE), tw, path="magic")
    with pytest.raises(ValueError, match="at most 4 rows"):
        dequant_matmul(torch.ones(5, 64, device=DEVICE), tw, path="gemv")


def test_nan_block_scale_reaches_the_output():
    w = weight(16, 64)
    w[2, 40] = float("nan")  # MX: the block's E8M0 scale becomes NaN, its codes stay finite
    q = quantize(w, "mxfp4")
    y = dequant_matmul(torch.ones(2, 64, device=DEVICE), TritonWeight.from_quantized(q.to(DEVICE)))
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, 3]]).any()


def test_shape_mismatch_is_a_clear_error():
    tw = TritonWeight.from_quantized(quantize(weight(16, 64), "nvfp4").to(DEVICE))
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        dequant_matmul(torch.ones(2, 32, device=DEVICE), tw)
