"""nvfp4 and mxfp4 weights on CPU through native kernels (`layers/csrc/fp4.cpp`), read from
their packed 4-bit codes; the weight-only FP8 formats (fp8_e4m3, fp8_e5m2) the same way, from
their code bytes.

Up to `GEMV_ROWS` rows of input (decode): one fused pass that decodes each weight block in
registers and multiplies it into every row, so a step reads 4.5 bits per weight instead of 16.
More rows (prefill, large batches): the codes are expanded into a dense matrix of the model
dtype by the native kernel, then one GEMM. Both use exactly the weights of the torch path
(weight_only.dequantize_fast: value x scale in fp32, then rounded to the model dtype); only the
order of the sums differs (and, for bf16 models on AVX512-BF16 CPUs, whose conversion flushes
them, weights below 1e-38 count as zero). Weight-only layers get them from `attach` where the runner's
`cpu_kernels` allows (layers/native_ops.select_kernels), never inside torch.compile.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.quant import elements as el
from tokenmill.quant.formats import E8M0_NAN, QuantizedTensor

FP4 = ("nvfp4", "mxfp4")
FP8 = ("fp8_e4m3", "fp8_e5m2")  # weight-only FP8: a code byte per weight, a scale per row
FORMATS = (*FP4, *FP8)
GEMV_ROWS = 8  # the kernel's limit of input rows per fused pass (csrc/fp4.cpp kMaxRows)
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@dataclass
class PackedWeight:
    codes: torch.Tensor  # uint8: FP4 [rows, cols / 2] (two codes a byte), FP8 [rows, cols]
    scales: torch.Tensor | None  # FP4: uint8 [rows, cols / block], the block scale codes
    lut: torch.Tensor | None  # FP4: fp32 [256], each scale code's value
    row_scale: torch.Tensor | None  # fp32 [rows]: nvfp4's and FP8's; None for mxfp4
    rows: int
    cols: int
    block: int  # FP4: 16 or 32; 0 for FP8
    e5m2: bool = False  # FP8: E5M2 codes, else E4M3


def scale_table(fmt: str) -> torch.Tensor:
    """fp32 [256]: the value of each block-scale code (E4M3 for nvfp4, E8M0 for mxfp4)."""
    codes = torch.arange(256, dtype=torch.int64)
    if fmt == "nvfp4":
        return el.decode(codes.to(torch.uint8), el.E4M3, torch.float32)
    values = torch.ldexp(torch.ones(256, dtype=torch.float64), codes - 127).float()
    return torch.where(codes == E8M0_NAN, torch.nan, values)


class Fp4Kernels:
    def __init__(self) -> None:
        from tokenmill.layers import native

        lib = native.load("fp4")
        self.gemv = lib.tm_fp4_gemv
        self.gemv.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64]
        self.gemv.argtypes += [_INT, _INT]
        self.gemv.restype = _INT
        self.dequant = lib.tm_fp4_dequant
        self.dequant.argtypes = [_PTR] * 5 + [_I64, _I64, _I64, _INT, _INT]
        self.dequant.restype = _INT
        self.gemv8 = lib.tm_fp8_gemv
        self.gemv8.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _INT, _INT, _INT]
        self.gemv8.restype = _INT
        self.dequant8 = lib.tm_fp8_dequant
        self.dequant8.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _INT, _INT, _INT]
        self.dequant8.restype = _INT
        self.tables = {fmt: scale_table(fmt) for fmt in FP4}

    def prepare(self, q: QuantizedTensor) -> PackedWeight | None:
        """The kernels' view of a 2-D nvfp4/mxfp4/fp8 weight on CPU, or None where they do not
        apply."""
        if q.format not in FORMATS or len(q.shape) != 2 or q.data.device.type != "cpu":
            return None
        rows, cols = q.shape
        if q.format in FP8:
            if cols % 16 or q.group_size is not None:
                return None
            codes = q.data.view(torch.uint8).contiguous()
            scale = q.scale.float().expand(rows).contiguous()  # per tensor or per row
            return PackedWeight(codes, None, None, scale, rows, cols, 0, q.format == "fp8_e5m2")
        block = q.group_size or 0
        if block not in (16, 32) or cols % 16 or cols % block:
            return None
        row_scale = None
        if q.global_scale is not None:
            row_scale = q.global_scale.float().expand(rows).contiguous()
        scales = q.scale.view(torch.uint8).contiguous()
        return PackedWeight(
            q.data.contiguous(), scales, self.tables[q.format], row_scale, rows, cols, block
        )

    def matmul(self, x2: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        """x2 [n, cols] (fp32 or bf16) @ W^T -> [n, rows] in x2's dtype."""
        n, threads = x2.shape[0], torch.get_num_threads()
        bf16 = int(x2.dtype == torch.bfloat16)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        if w.block:  # FP4: codes, block scales and their table, row scales
            weight = (ptr(w.codes), ptr(w.scales), ptr(w.lut), ptr(w.row_scale))
            gemv, dequant, shape = self.gemv, self.dequant, (w.rows, w.cols, w.block)
        else:  # FP8: codes, row scales
            weight = (ptr(w.codes), ptr(w.row_scale))
            gemv, dequant, shape = self.gemv8, self.dequant8, (w.rows, w.cols, int(w.e5m2))
        if 0 < n <= GEMV_ROWS:
            xc = x2.contiguous()
            y = torch.empty(n, w.rows, dtype=torch.float32)
            gemv(xc.data_ptr(), n, *weight, y.data_ptr(), *shape, bf16, threads)
            return y.to(x2.dtype)
        dense = torch.empty(w.rows, w.cols, dtype=x2.dtype)
        dequant(*weight, dense.data_ptr(), *shape, bf16, threads)
        return F.linear(x2, dense)


_SHARED: list[Fp4Kernels] = []


def shared_kernels() -> Fp4Kernels:
    """One per process, built on first use (native.NativeUnavailable where it cannot be)."""
    if not _SHARED:
        _SHARED.append(Fp4Kernels())
    return _SHARED[0]
