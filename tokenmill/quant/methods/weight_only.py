"""Weight-only quantization: weights stored in any format, activations in the model dtype.

On CUDA every format goes through the Triton kernels of triton_dequant.py (fused tiles, gemv,
or decode-once + cuBLAS: the fastest measured per shape). On CPU, once the native kernels are
attached: int8, int4, nvfp4, mxfp4 and fp8 through csrc/gguf.cpp over their own codes
(`NativeRowsKernel`: a decode-GEMV at 1-8 rows, fused into the decoder layers' halves, a native
expansion + oneDNN's GEMM above); the nvfp4/mxfp4 shapes gguf.cpp does not take through
fp4_cpu.py; without them (cpu_kernels=torch, no compiler, no AVX-512) int4 through
`_weight_int4pack_mm_for_cpu` and int8 `_weight_int8pack_mm` (bf16), everything else
dequantized on the fly before the GEMM, which saves memory, not time (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tokenmill.quant import elements as el
from tokenmill.quant.formats import QuantizedTensor, dequantize_fast, quantize
from tokenmill.quant.methods.base import (
    LinearKernel,
    QuantMethod,
    finish,
    quantized_tensors,
    rows,
)


class WeightOnlyMethod(QuantMethod):
    def __init__(
        self,
        format: str,
        group_size: int | None = None,
        symmetric: bool = False,
        gptq: bool = False,
        scale_search: bool = False,
        awq: bool = False,
    ):
        from tokenmill.quant.scale_search import SEARCHABLE

        if scale_search and format not in SEARCHABLE:
            raise ValueError(f"scale_search applies to {tuple(SEARCHABLE)}, not {format}")
        self.format = format
        self.group_size = group_size
        self.symmetric = symmetric
        self.gptq = gptq
        self.scale_search = scale_search
        self.awq = awq

    keep_row_table: bool = False  # a tied head: the embedding reads this layer's table
    row_table: QuantizedTensor | None = None  # kept whole where a kernel repacks the codes

    @property
    def wants_calibration(self) -> bool:
        return self.gptq or self.scale_search or self.awq

    @property
    def wants_hessian(self) -> bool:
        return self.gptq or self.awq

    def smoothing(self, layer) -> torch.Tensor | None:
        """AWQ's input-channel scales (awq.py), from calibration statistics."""
        stats = self.calibration
        if not self.awq or stats is None:
            return None
        from tokenmill.quant.awq import awq_scale

        w = layer.weight.data
        return awq_scale(
            w,
            layer.output_sizes,
            stats.input_mean_square,
            self.quantize_weight,
            stats.input_hessian,
        )

    def quantize_weight(self, weight):
        if self.format != "int4":
            q = quantize(weight, self.format)
        else:
            group = self.group_size or int4_group(weight.shape[1])
            q = quantize(weight, "int4", group_size=group, symmetric=self.symmetric)
        return q  # scale search, if asked, runs in quantize_shards with calibration statistics

    def install(self, layer, qweight):
        if self.keep_row_table:
            self.row_table = qweight  # a second copy only where a kernel repacks the codes
        if self.input_smooth is not None:  # AWQ: the input is divided by s at run time
            self.smooth_inv = (1.0 / self.input_smooth).to(layer.params_dtype).contiguous()
        self.qweight = qweight
        on_cpu_bf16 = qweight.data.device.type == "cpu" and layer.params_dtype == torch.bfloat16
        if qweight.data.device.type == "cuda" and triton_available():
            self.compilable = False  # its first calls time the kernel paths (triton_dequant.py)
            self.impl = TritonKernel(qweight)
            self.qweight = replace(qweight, data=qweight.data[:0])  # codes live in the kernel
        elif on_cpu_bf16 and qweight.format == "int8" and qweight.scale.dim() == 1:
            self.impl = Int8PackKernel(qweight)
        elif on_cpu_bf16 and qweight.format == "int4":
            # torch's packed copy beside the codes until `settle` drops the one left unread
            self.impl = Int4CpuKernel(qweight)
        else:
            self.impl = DequantizeKernel(qweight)

    def tensors(self):
        return super().tensors() + quantized_tensors(self.row_table)

    def settle(self) -> None:
        """Once the kernels are chosen (layers/native_ops.select_kernels): int4 on CPU held its
        codes (the native rows read them) and torch's packed copy (Int4CpuKernel); keep one."""
        q = self.qweight
        if q is None or q.format != "int4":
            return
        if isinstance(self.impl, NativeRowsKernel) and isinstance(
            self.impl.fallback, Int4CpuKernel
        ):
            self.impl.fallback = DequantizeKernel(q)  # what a compiled graph traces
        elif isinstance(self.impl, Int4CpuKernel) and q.data.numel():
            self.qweight = replace(q, data=q.data[:0])  # codes live in the kernel

    def attach_native(self, layer) -> bool:
        """Use the native CPU kernels for nvfp4/mxfp4/fp8 (quant/fp4_cpu.py) and, at decode
        sizes, for int8 (the GEMVs of csrc/gguf.cpp over the same codes) where they apply;
        called by layers/native_ops.select_kernels when the runner's cpu_kernels allows."""
        from tokenmill.quant import fp4_cpu

        if self.qweight is not None and self.qweight.format in ROWS_FORMATS:
            if self._attach_rows(layer):
                return True
        if not isinstance(self.impl, DequantizeKernel) or self.impl.q.format not in fp4_cpu.FORMATS:
            return False
        if layer.params_dtype not in (torch.float32, torch.bfloat16):
            return False
        kernels = fp4_cpu.shared_kernels()
        weight = kernels.prepare(self.impl.q)
        if weight is None:
            return False
        self.impl = NativeFp4Kernel(kernels, weight, self.impl)
        return True

    def _attach_rows(self, layer) -> bool:
        """int8, int4, nvfp4, mxfp4 and fp8 through csrc/gguf.cpp's GEMVs and fused halves,
        over the same codes (NativeRowsKernel)."""
        from tokenmill.quant.methods.gguf import GGUFWeight, kernels_for

        q = self.qweight
        assert q is not None and self.impl is not None
        if q.data.device.type != "cpu" or len(q.shape) != 2:
            return False
        if q.format == "int8":
            if q.scale.dim() > 1:
                return False
            weight = GGUFWeight.int8_rows(q.data, q.scale.float().expand(q.shape[0]))
        elif q.format == "int4":
            weight = GGUFWeight.int4_rows(q) if q.data.numel() else None
        elif q.format in ("fp8_e4m3", "fp8_e5m2"):
            weight = GGUFWeight.fp8_rows(q)
        else:
            weight = GGUFWeight.fp4_rows(q)
        kernels = None if weight is None else kernels_for(weight, layer.params_dtype)
        if kernels is None:
            return False
        self.impl = NativeRowsKernel(kernels, weight, self.impl)
        return True

    def apply(self, layer, x):
        assert self.impl is not None, "apply before install"
        x2 = rows(x)
        if self.smooth_inv is not None:
            x2 = x2 * self.smooth_inv
        return finish(self.impl(x2), x, layer.bias)


class DequantizeKernel(LinearKernel):
    """Any format: dequantize the weight on the fly, then the GEMM (saves memory, not time)."""

    def __init__(self, q: QuantizedTensor) -> None:
        self.q = q
        self.name = f"dequantize {q.format} on the fly + GEMM (no fused kernel)"

    def __call__(self, x2):
        return F.linear(x2, dequantize_fast(self.q, x2.dtype))


class Int8PackKernel(LinearKernel):
    name = "aten._weight_int8pack_mm"

    def __init__(self, q: QuantizedTensor) -> None:
        self.codes = q.data
        self.scale = q.scale.to(torch.bfloat16)

    def __call__(self, x2):
        return torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scale)


class Int4CpuKernel(LinearKernel):
    name = "aten._weight_int4pack_mm_for_cpu"

    def __init__(self, q: QuantizedTensor) -> None:
        self.packed, self.scales_zeros = int4pack_for_cpu(q)
        self.group_size = q.group_size

    def __call__(self, x2):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_zeros
        )


class TritonKernel(LinearKernel):
    name = "triton dequant-matmul"

    def __init__(self, q: QuantizedTensor) -> None:
        from tokenmill.quant.triton_dequant import TritonWeight

        self.weight = TritonWeight.from_quantized(q)

    def __call__(self, x2):
        from tokenmill.quant.triton_dequant import dequant_matmul

        return dequant_matmul(x2, self.weight)

    def tensors(self):
        w = self.weight
        return [t for t in (w.codes, w.scale, w.zero, w.row_scale) if t is not None]


class NativeFp4Kernel(LinearKernel):
    """tokenmill's CPU kernels for nvfp4/mxfp4/fp8 codes; a compiled graph takes the torch
    fallback (the native call is opaque to it)."""

    def __init__(self, kernels, weight, fallback: DequantizeKernel) -> None:
        self.kernels, self.weight, self.fallback = kernels, weight, fallback
        self.name = (
            f"native {fallback.q.format}: fused decode-GEMV up to 8 rows, else decode + GEMM"
        )

    def __call__(self, x2):
        if torch.compiler.is_compiling():
            return self.fallback(x2)
        return self.kernels.matmul(x2, self.weight)


ROWS_FORMATS = ("int8", "int4", "nvfp4", "mxfp4", "fp8_e4m3", "fp8_e5m2")  # NativeRowsKernel's


class NativeRowsKernel(LinearKernel):
    """int8, int4, nvfp4, mxfp4, fp8 weight-only through csrc/gguf.cpp over the same codes: 1-8 rows its
    GEMV (one native call per decoder-layer half where the layers fuse), more rows the weight
    expanded to the model dtype (exactly dequantize_fast's values) and oneDNN's GEMM (int8: 3.5-7x
    _weight_int8pack_mm at 128-512 rows here, BENCHMARKS.md). A compiled graph takes the previous
    kernel."""

    def __init__(self, kernels, weight, fallback: LinearKernel) -> None:
        from tokenmill.quant.methods.gguf import GEMV_ROWS

        self.kernels, self.w, self.fallback, self.gemv_rows = kernels, weight, fallback, GEMV_ROWS
        self.name = (
            f"native {weight.types[0].lower()}: GEMV up to {GEMV_ROWS} rows, else decode + GEMM"
        )

    def __call__(self, x2):
        if torch.compiler.is_compiling():
            return self.fallback(x2)
        if 0 < x2.shape[0] <= self.gemv_rows:
            return self.kernels.matmul(x2, self.w)
        return self.kernels.linear(x2, self.w)

    def tensors(self):
        return self.w.tensors() + self.fallback.tensors()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def int4_group(in_features: int) -> int:
    """The int4 group size: 128 where it divides the row, else the largest of 64/32 that does."""
    for group in (128, 64, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


def int4pack_for_cpu(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 (w = (c - z) * s) in torch's CPU layout (w = (c - 8) * s + zero)."""
    codes = el.unpack_4bit(q.data).to(torch.int32)  # [out, in]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = q.scale.float()  # [out, groups]
    zp = q.zero_point.float() if q.zero_point is not None else torch.full_like(scale, 8.0)
    zero = (8.0 - zp) * scale
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1)  # [groups, out, 2]
    return packed, scales_zeros.to(torch.bfloat16).contiguous()
