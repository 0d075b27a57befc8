"""fp8: E4M3 weights per channel x E4M3 activations, "current" scaling (each token's amax) or
"delayed" (one scale from the amax history of earlier steps, as Transformer Engine does):
torch._scaled_mm on CUDA; on CPU, whose _scaled_mm is a slow reference (2.7 ms vs 0.03 ms bf16 for
576x1536), the same FP8 values go through bf16/fp32 GEMMs: exact FP8 numerics, fp32
accumulation. With the native kernels (current scaling), the E4M3 codes are the one copy:
csrc/gguf.cpp's GEMV at 1-8 rows (x quantized to E4M3 inside, as Fp8Kernel does; fused into the
decoder layers' halves), above that the codes expanded to the model dtype and one GEMM
(`NativeFp8Kernel`); without them (or delayed scaling) the values packed for oneDNN."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tokenmill.quant import elements as el
from tokenmill.quant.formats import (
    quantize,
)
from tokenmill.quant.methods.base import LinearKernel, QuantMethod, finish, rows
from tokenmill.quant.smoothquant import SmoothQuantMixin, inverse_smoothing, smooth_input


@dataclass
class AmaxHistory:
    """Ring buffer of recent activation amaxes; the delayed scale is their maximum."""

    length: int
    values: torch.Tensor | None = None
    count: int = 0

    def scale(self, current_amax: torch.Tensor, max_value: float) -> torch.Tensor:
        if self.values is None:
            self.values = torch.zeros(self.length, device=current_amax.device)
        amax = current_amax if self.count == 0 else self.values.max()  # first call: current
        self.values[self.count % self.length] = current_amax
        self.count += 1
        return (amax / max_value).clamp(min=1e-12)


class FP8Method(SmoothQuantMixin, QuantMethod):
    format = "fp8_e4m3"
    amax_history: AmaxHistory | None = None  # delayed scaling's record, one per layer

    def __init__(
        self,
        activation_scaling: str = "current",
        amax_history_len: int = 16,
        smoothquant_alpha: float | None = 0.5,
        gptq: bool = False,
    ) -> None:
        if activation_scaling not in ("current", "delayed"):
            raise ValueError(
                f"activation_scaling must be 'current' or 'delayed', got {activation_scaling!r}"
            )
        if amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {amax_history_len}")
        self.activation_scaling = activation_scaling
        self.amax_history_len = amax_history_len
        self.compilable = activation_scaling == "current"  # the amax history is Python state
        self.smoothquant_alpha = smoothquant_alpha
        self.gptq = gptq

    def quantize_weight(self, weight):
        return quantize(weight, "fp8_e4m3", granularity="channel")

    def fake_quantize_activation(self, x):  # current scaling: each token's amax
        return quantize(x, "fp8_e4m3", granularity="token").dequantize().double()

    def install(self, layer, qweight):
        self.smooth_inv = inverse_smoothing(self.input_smooth)
        self.amax_history = AmaxHistory(self.amax_history_len)
        if qweight.data.device.type == "cuda":
            self.impl = ScaledMMKernel(qweight, self.activation_scale, layer.params_dtype)
            self.qweight = qweight
        else:  # the codes kept until `settle` knows whether the native kernels read them
            self.impl = EmulatedFp8Kernel(qweight, self.activation_scale, layer.params_dtype)
            self.qweight = qweight

    def attach_native(self, layer) -> bool:
        """Current scaling on CPU: csrc/gguf.cpp's fp8 rows over the E4M3 codes
        (NativeFp8Kernel); called by layers/native_ops.select_kernels."""
        from tokenmill.quant.methods.gguf import GGUFWeight, kernels_for

        impl, q = self.impl, self.qweight
        if self.activation_scaling != "current" or not isinstance(impl, EmulatedFp8Kernel):
            return False
        if q is None or q.data.device.type != "cpu" or not q.data.numel():
            return False
        weight = GGUFWeight.fp8a8_rows(q.data, impl.weight_scale, self.smooth_inv)
        kernels = kernels_for(weight, layer.params_dtype)
        if kernels is None:
            return False
        self.impl = NativeFp8Kernel(kernels, weight, self.activation_scale, layer.params_dtype)
        return True

    def settle(self) -> None:
        """One copy of the weight: the codes (native kernels) or the packed values (not)."""
        q = self.qweight
        if isinstance(self.impl, EmulatedFp8Kernel) and q is not None and q.data.numel():
            self.qweight = replace(q, data=q.data[:0])  # codes live on as values

    def activation_scale(self, x2: torch.Tensor) -> torch.Tensor:  # [tokens, 1] fp32
        amax = x2.abs().amax(dim=1, keepdim=True).float()
        if self.activation_scaling == "current":
            return (amax / el.E4M3.max_value).clamp_(min=1e-12)
        assert self.amax_history is not None
        scale = self.amax_history.scale(amax.max(), el.E4M3.max_value)
        return scale.expand(x2.shape[0], 1)

    def apply(self, layer, x):
        assert self.impl is not None, "apply before install"
        x2 = rows(x)
        if isinstance(self.impl, NativeFp8Kernel) and self.impl.takes(x2):
            return finish(self.impl.gemv(x2), x, layer.bias)  # smoothing inside the kernel
        return finish(self.impl(smooth_input(self.smooth_inv, x2)), x, layer.bias)


class Fp8Kernel(LinearKernel):
    """E4M3 activations, scaled per token by the method's rule, x E4M3 weights per channel."""

    def __init__(self, qweight, activation_scale, dtype: torch.dtype) -> None:
        self.weight_scale = qweight.scale.float().expand(qweight.shape[0]).contiguous()  # [out]
        self.activation_scale = activation_scale  # x2 -> [tokens, 1] fp32 (current or delayed)
        self.dtype = dtype

    def __call__(self, x2):  # x2 [tokens, in] fp32, smoothed
        scale = self.activation_scale(x2)
        limit = el.E4M3.max_value  # delayed scales can be stale: saturate, as the format does
        xq = (x2 / scale).clamp_(-limit, limit).to(torch.float8_e4m3fn)
        return self.gemm(xq, scale)

    @abstractmethod
    def gemm(self, xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """E4M3 codes [tokens, in] with their scales [tokens, 1] -> y [tokens, out]."""


class ScaledMMKernel(Fp8Kernel):
    name = "torch._scaled_mm"

    def __init__(self, qweight, activation_scale, dtype: torch.dtype) -> None:
        super().__init__(qweight, activation_scale, dtype)
        self.weight_fp8 = qweight.data

    def gemm(self, xq, scale):
        from tokenmill.quant.scaled_mm import scaled_mm_rowwise

        return scaled_mm_rowwise(xq, self.weight_fp8, scale, self.weight_scale, self.dtype)


class EmulatedFp8Kernel(Fp8Kernel):
    """CPU: the same FP8 values through bf16/fp32 GEMMs (exact FP8 numerics; torch's CPU
    _scaled_mm is a slow reference)."""

    name = "emulated: FP8 values in bf16/fp32 GEMMs (no fast FP8 GEMM on CPU)"

    def __init__(self, qweight, activation_scale, dtype: torch.dtype) -> None:
        from tokenmill.layers.linear import pack_for_cpu

        super().__init__(qweight, activation_scale, dtype)
        values = qweight.data.to(dtype)  # exact: E4M3 fits in bf16 and fp32
        self.packed = pack_for_cpu(values)
        self.values = values if self.packed is None else None

    def gemm(self, xq, scale):
        from tokenmill.layers.linear import packed_linear

        xv = xq.to(self.dtype)
        if self.packed is not None:
            acc = packed_linear(xv, self.packed)
        else:
            acc = F.linear(xv, self.values)
        return acc.float().mul_(scale).mul_(self.weight_scale)


class NativeFp8Kernel(Fp8Kernel):
    """The E4M3 codes through csrc/gguf.cpp (row kind E4M3A8): 1-8 rows its GEMV, x quantized
    inside exactly as Fp8Kernel does (current scaling), exact products and fp32 sums, the same
    two rescales; more rows (or a compiled graph, which traces the torch quantization), the codes
    expanded to the model dtype and one GEMM. One copy of the weight: the codes."""

    def __init__(self, kernels, weight, activation_scale, dtype: torch.dtype) -> None:
        from tokenmill.quant.methods.gguf import E4M3_ROWS, GEMV_ROWS, GGUFWeight

        self.kernels, self.w, self.gemv_rows, self.dtype = kernels, weight, GEMV_ROWS, dtype
        self.weight_scale = weight.scales[0]
        self.activation_scale = activation_scale
        raw = weight.segments[0][1]  # the values alone, for the GEMM path's expansion
        self.values = GGUFWeight([(E4M3_ROWS, raw)], weight.cols, [torch.ones(raw.shape[0])])
        self.name = f"native fp8: GEMV up to {GEMV_ROWS} rows, else codes expanded + GEMM"

    def takes(self, x2: torch.Tensor) -> bool:
        return 0 < x2.shape[0] <= self.gemv_rows and not torch.compiler.is_compiling()

    def gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [1-8, in] unsmoothed -> fp32 [rows, out]."""
        return self.kernels.matmul(x2, self.w)

    def gemm(self, xq, scale):
        acc = self.kernels.linear(xq.to(self.dtype), self.values)  # exact values: E4M3 fits
        return acc.float().mul_(scale).mul_(self.weight_scale)

    def tensors(self):
        return self.w.tensors() + self.values.tensors()
