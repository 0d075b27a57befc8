"""Weight-only quantization: weights stored in any format, activations in the model dtype.

On CUDA every format goes through the Triton kernels of triton_dequant.py (fused tiles, gemv,
or decode-once + cuBLAS: the fastest measured per shape). On CPU, fused kernels where torch has
them (int8: `_weight_int8pack_mm`, int4: `_weight_int4pack_mm_for_cpu`, both for bf16
activations), tokenmill's own for nvfp4, mxfp4, fp8_e4m3 and fp8_e5m2 (fp4_cpu.py: a fused
decode-GEMV at decode sizes, faster than bf16 at batch 1); the fp6 formats dequantize the weight
on the fly before the GEMM, which saves memory, not time (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tokenmill.quant import elements as el
from tokenmill.quant.formats import QuantizedTensor, element_values, expanded_scale, quantize
from tokenmill.quant.methods.base import QuantMethod, finish, rows


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

    def smoothing(self, layer) -> torch.Tensor | None:
        """AWQ's input-channel scales (awq.py), from calibration statistics."""
        importance = getattr(layer, "input_mean_square", None)
        if not self.awq or importance is None:
            return None
        from tokenmill.quant.awq import awq_scale

        hessian = getattr(layer, "input_hessian", None)
        w = layer.weight.data
        return awq_scale(w, layer.output_sizes, importance, self.quantize_weight, hessian)

    def quantize_weight(self, weight):
        if self.format != "int4":
            q = quantize(weight, self.format)
        else:
            group = self.group_size or int4_group(weight.shape[1])
            q = quantize(weight, "int4", group_size=group, symmetric=self.symmetric)
        return q  # scale search, if asked, runs in quantize_shards with calibration statistics

    def install(self, layer, qweight):
        layer.qweight = qweight
        if getattr(layer, "keep_row_table", False):  # a tied head: the embedding reads its rows
            layer.row_table = qweight  # (a second copy only where a kernel repacks the codes)
        s = getattr(layer, "input_smooth", None)  # AWQ: the input is divided by s at run time
        if s is not None:
            layer.smooth_inv = (1.0 / s.float()).to(layer.params_dtype).contiguous()
        if qweight.data.device.type == "cuda" and triton_available():
            from tokenmill.quant.triton_dequant import TritonWeight

            self.kernel = "triton dequant-matmul"
            self.compilable = False  # its first calls time the kernel paths (triton_dequant.py)
            layer.triton_weight = TritonWeight.from_quantized(qweight)
            layer.qweight = replace(qweight, data=qweight.data[:0])  # codes live in triton_weight
            return
        on_cpu_bf16 = qweight.data.device.type == "cpu" and layer.params_dtype == torch.bfloat16
        if on_cpu_bf16 and qweight.format == "int8" and qweight.scale.dim() == 1:
            self.kernel = "aten._weight_int8pack_mm"
            layer.int8_scale = qweight.scale.to(torch.bfloat16)
        elif on_cpu_bf16 and qweight.format == "int4":
            self.kernel = "aten._weight_int4pack_mm_for_cpu"
            layer.int4_packed, layer.int4_scales_zeros = int4pack_for_cpu(qweight)
            layer.qweight = replace(qweight, data=qweight.data[:0])  # the codes live in int4_packed
        else:
            self.kernel = f"dequantize {qweight.format} on the fly + GEMM (no fused kernel)"

    def attach_native(self, layer) -> bool:
        """Use the native CPU kernels for nvfp4/mxfp4/fp8 (quant/fp4_cpu.py) where they apply;
        called by layers/native_ops.select_kernels when the runner's cpu_kernels allows."""
        from tokenmill.quant import fp4_cpu

        q = getattr(layer, "qweight", None)
        if q is None or q.format not in fp4_cpu.FORMATS or hasattr(layer, "triton_weight"):
            return False
        if layer.params_dtype not in (torch.float32, torch.bfloat16):
            return False
        kernels = fp4_cpu.shared_kernels()
        weight = kernels.prepare(q)
        if weight is None:
            return False
        layer.fp4_weight, layer.fp4_kernels = weight, kernels
        self.kernel = f"native {q.format}: fused decode-GEMV up to 8 rows, else decode + GEMM"
        return True

    def apply(self, layer, x):
        q: QuantizedTensor = layer.qweight
        x2 = rows(x)
        if hasattr(layer, "smooth_inv"):
            x2 = x2 * layer.smooth_inv
        if hasattr(layer, "fp4_weight") and not torch.compiler.is_compiling():
            return finish(layer.fp4_kernels.matmul(x2, layer.fp4_weight), x, layer.bias)
        if hasattr(layer, "triton_weight"):
            from tokenmill.quant.triton_dequant import dequant_matmul

            y = dequant_matmul(x2, layer.triton_weight)
        elif hasattr(layer, "int8_scale"):
            y = torch.ops.aten._weight_int8pack_mm(x2, q.data, layer.int8_scale)
        elif hasattr(layer, "int4_packed"):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, layer.int4_packed, q.group_size, layer.int4_scales_zeros
            )
        else:
            y = F.linear(x2, dequantize_fast(q, x.dtype))
        return finish(y, x, layer.bias)


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


def dequantize_fast(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, in fp32 arithmetic (formats.py's float64 path is the reference)."""
    values = element_values(q, torch.float32)
    scale = expanded_scale(q).float()
    if q.group_size is not None:
        values = values.view(values.shape[0], -1, q.group_size) * scale
        return values.flatten(1).to(dtype)
    return (values * scale).to(dtype)
