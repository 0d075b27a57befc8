"""Triton dequantize-and-multiply for every weight-only format on CUDA.

`y = x @ dequant(W)^T` by one of three paths (kernels in triton_kernels.py): "dot" (decoded
weight tiles into `tl.dot`, the float weight never in memory), "gemv" (a few rows: multiply and
sum) or "dequant" (the weight decoded once per call into the activation dtype, then cuBLAS). On
CUDA the first call per (format, shape, dtype, row bucket) times each path that applies and keeps
the fastest, as an autotuner does; elsewhere (Triton's interpreter) the choice is fixed. When
the output tiles are too few to fill the device, K is split across programs that add into an
fp32 output with atomics.

Codes and scales keep exactly the layouts of `formats.py` (a weight is [N, K] rows):
  int4    two codes per byte, element 2i in the low nibble; fp32 scale and uint8 zero point
          (8 when symmetric) per group of GROUP along a row
  mxfp4   E2M1 codes, packed as int4; E8M0 uint8 scale per 32 (2^(s - 127), 255 is NaN)
  nvfp4   E2M1 codes; E4M3 scale per 16, times one fp32 scale per row (`global_scale`)
  fp6_*   a little-endian bit stream: element k occupies bits [6k, 6k + 6) of its row;
          E8M0 scale per 32
  int8    one code per byte, fp32 scale per row; fp8_e4m3/e5m2 likewise (finite codes only)
The decoded weight equals `weight_only.dequantize_fast` (fp32 products, then the activation
dtype), so this kernel and the reference differ only in summation order. Tests run it through
Triton's interpreter on CPU (`TRITON_INTERPRET=1`) and compiled on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from tokenmill.quant.formats import QuantizedTensor
from tokenmill.quant.triton_kernels import _dequant_kernel, _matmul_kernel

# format -> (kernel id, element exponent bits, mantissa bits, bias, subnormal step 2^(1-B-M))
_FORMATS = {
    "int4": (0, 0, 0, 0, 0.0),
    "mxfp4": (1, 2, 1, 1, 0.5),
    "nvfp4": (2, 2, 1, 1, 0.5),
    "fp6_e3m2": (3, 3, 2, 3, 2.0**-4),
    "fp6_e2m3": (4, 2, 3, 1, 2.0**-3),
    "int8": (5, 0, 0, 0, 0.0),
    "fp8_e4m3": (6, 4, 3, 7, 2.0**-9),
    "fp8_e5m2": (7, 5, 2, 15, 2.0**-16),
}
SUPPORTED = tuple(_FORMATS)


@dataclass
class TritonWeight:
    """A quantized [N, K] weight laid out for the kernels (contiguous, uint8 codes)."""

    format: str
    n: int
    k: int
    group: int
    codes: torch.Tensor  # uint8 [N, row_bytes]
    scale: torch.Tensor  # fp32 (int4, int8, fp8) or uint8 (E8M0 / E4M3 bits) [N, K / group];
    # int8 and fp8: [N, 1], or [1, 1] for one scale per tensor (row stride 0 in the kernel)
    zero: torch.Tensor | None  # uint8 [N, K / group] (int4 with zero point)
    row_scale: torch.Tensor | None  # fp32 [N] or [1] (nvfp4's global scale)

    @classmethod
    def from_quantized(cls, q: QuantizedTensor) -> TritonWeight:
        if q.format not in _FORMATS:
            raise ValueError(f"no Triton kernel for {q.format}; kernels exist for {SUPPORTED}")
        n, k = q.shape
        codes, scale, group = q.data, q.scale, q.group_size
        if q.format in ("int8", "fp8_e4m3", "fp8_e5m2"):  # one fp32 scale per row (or tensor)
            codes = codes.view(torch.uint8) if codes.is_floating_point() else codes
            scale, group = scale.float().reshape(-1, 1), k
        elif q.format != "int4":
            scale = scale.view(torch.uint8)
        row_scale = None
        if q.global_scale is not None:
            row_scale = q.global_scale.float().reshape(-1)
        zero = q.zero_point.contiguous() if q.zero_point is not None else None
        assert group is not None
        return cls(q.format, n, k, group, codes.contiguous(), scale.contiguous(), zero, row_scale)

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scale, self.zero, self.row_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


_CHOICE: dict[tuple, str] = {}
PATHS = ("dot", "gemv", "dequant")


def _args(w: TritonWeight) -> tuple:
    """The weight's pointer and stride arguments, shared by the three kernels."""
    zero = w.zero if w.zero is not None else w.scale
    row_scale = w.row_scale if w.row_scale is not None else w.scale
    s_row = 0 if w.scale.shape[0] == 1 else w.scale.shape[1]
    g_row = 0 if w.row_scale is None or w.row_scale.numel() == 1 else 1
    return (w.codes, w.scale, zero, row_scale), (w.codes.shape[1], s_row, g_row)


def _consts(w: TritonWeight) -> dict:
    fmt, e, mb, b, sub = _FORMATS[w.format]
    return dict(FMT=fmt, GROUP=w.group, HAS_ZERO=w.zero is not None, E=e, MB=mb, B=b, SUB=sub)


def _block_k(k: int, largest: int) -> int:
    return next(b for b in (256, 128, 64, 32, 16) if b <= largest and k % b == 0)


def _split(k: int, bk: int, tiles: int, device: torch.device, split_k: int | None):
    """(programs along K, K per program): `split_k`, or enough programs to fill the device."""
    if split_k is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if (
            device.type == "cuda") else 2  # fmt: skip
        split_k = max(1, min(k // bk // 2, 2 * sms // max(tiles, 1)))
    per = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    return triton.cdiv(k, per), per


def _launch(x, w, bm: int, bn: int, bk: int, split_k: int | None, gemv: bool) -> torch.Tensor:
    """Run the matmul kernel over (row tiles, column tiles, K splits); gemv: all rows (<= bm) in
    one tile."""
    m = x.shape[0]
    row_tiles = triton.cdiv(m, bm)
    split, per = _split(w.k, bk, row_tiles * triton.cdiv(w.n, bn), x.device, split_k)
    atomic = split > 1
    y = torch.zeros(m, w.n, device=x.device, dtype=torch.float32 if atomic else x.dtype)
    ptrs, strides = _args(w)
    grid = (row_tiles, triton.cdiv(w.n, bn), split)
    _matmul_kernel[grid](
        x, *ptrs, y, m, w.n, w.k, x.stride(0), y.stride(0), *strides, **_consts(w),
        BM=bm, BN=bn, BK=bk, K_SPLIT=per, ATOMIC=atomic, GEMV=gemv,
        IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return y.to(x.dtype) if atomic else y


def dequantize(w: TritonWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole [N, K] weight decoded into `dtype` (what the "dequant" path multiplies)."""
    out = torch.empty(w.n, w.k, device=w.codes.device, dtype=dtype)
    ptrs, strides = _args(w)
    bn, bk = 32, _block_k(w.k, 128)
    grid = (triton.cdiv(w.n, bn), triton.cdiv(w.k, bk))
    _dequant_kernel[grid](*ptrs, out, w.n, w.k, *strides, **_consts(w), BN=bn, BK=bk)
    return out


def _run(path: str, x: torch.Tensor, w: TritonWeight, split_k: int | None) -> torch.Tensor:
    m = x.shape[0]
    if path == "dequant":
        return F.linear(x, dequantize(w, x.dtype))
    if path == "gemv":
        if m > 4:
            raise ValueError(f"the gemv path takes at most 4 rows, got {m}")
        bm = 1 << (m - 1).bit_length() if m > 1 else 1
        return _launch(x, w, bm, 32, _block_k(w.k, 128 if bm < 4 else 64), split_k, gemv=True)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if w.n >= 4096 else 32
    return _launch(x, w, bm, bn, _block_k(w.k, 64), split_k, gemv=False)


def _candidates(m: int) -> list[str]:
    return (["gemv"] if m <= 4 else []) + (["dot"] if m <= 256 else []) + ["dequant"]


def choose_path(x: torch.Tensor, w: TritonWeight) -> str:
    """The path `dequant_matmul` takes for x: on CUDA the fastest measured for this (format,
    shape, dtype, row bucket), timed once on first use; elsewhere the first that applies."""
    m = x.shape[0]
    candidates = _candidates(m)
    if x.device.type != "cuda":
        return candidates[0]
    bucket = 1 << (m - 1).bit_length() if m > 1 else 1
    key = (x.device, x.dtype, w.format, w.n, w.k, w.group, min(bucket, 4096))
    if key not in _CHOICE:
        _CHOICE[key] = min(candidates, key=lambda p: _seconds(lambda: _run(p, x, w, None)))
    return _CHOICE[key]


def _seconds(fn, repeats: int = 5) -> float:
    fn(), fn()  # compile, warm up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def chosen_paths() -> dict[tuple, str]:
    """What the measured choice picked so far: (device, dtype, format, N, K, group, rows) -> path."""
    return dict(_CHOICE)


def dequant_matmul(
    x: torch.Tensor, w: TritonWeight, path: str | None = None, split_k: int | None = None
) -> torch.Tensor:
    """x [M, K] (fp32, fp16 or bf16) @ dequant(w)^T -> [M, N] in x's dtype, by `path` (one of
    PATHS; default: the measured choice) with K split `split_k` ways (default: to fill the GPU)."""
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}], got {tuple(x.shape)}")
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    x = x.contiguous()
    return _run(path or choose_path(x, w), x, w, split_k)
