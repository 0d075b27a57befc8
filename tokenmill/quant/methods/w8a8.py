"""w8a8: int8 weights per channel x int8 activations per token (dynamic; symmetric, or with a
zero point per token corrected exactly in int32): torch._int_mm (AVX-512 VNNI on CPU, IMMA on
CUDA), int32 accumulators, one fp32 rescale. On CPU, 1-8 rows (decode) take csrc/gguf.cpp's
w8a8 GEMV over the same codes (and the decoder layers' fused halves): the same quantization of
x, exact int32 sums, the same two fp32 rescales, so the same bits as _int_mm's path."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from tokenmill.quant.formats import (
    quantize,
)
from tokenmill.quant.methods.base import LinearKernel, QuantMethod, finish, rows
from tokenmill.quant.smoothquant import SmoothQuantMixin, inverse_smoothing, smooth_input


class W8A8Method(SmoothQuantMixin, QuantMethod):
    format = "int8"

    def __init__(
        self,
        smoothquant_alpha: float | None = 0.5,
        gptq: bool = False,
        activation_zero_point: bool = False,
    ) -> None:
        self.smoothquant_alpha = smoothquant_alpha
        self.gptq = gptq
        self.activation_zero_point = activation_zero_point

    def quantize_weight(self, weight):
        return quantize(weight, "int8", granularity="channel")

    def fake_quantize_activation(self, x):
        from tokenmill.quant.smoothquant import int8_per_token

        return int8_per_token(x, self.activation_zero_point)

    def install(self, layer, qweight):
        self.smooth_inv = inverse_smoothing(self.input_smooth)
        self.impl = Int8MMKernel(qweight, self.activation_zero_point)
        self.qweight = replace(qweight, data=self.impl.weight_t.t())  # a view: stored once

    def apply(self, layer, x):
        assert self.impl is not None, "apply before install"
        x2 = rows(x)
        if isinstance(self.impl, NativeW8A8Kernel) and self.impl.takes(x2):
            return finish(self.impl.gemv(x2), x, layer.bias)  # smoothing inside the kernel
        return finish(self.impl(smooth_input(self.smooth_inv, x2)), x, layer.bias)

    def attach_native(self, layer) -> bool:
        """1-8 rows through csrc/gguf.cpp's w8a8 GEMV (NativeW8A8Kernel) where it applies:
        symmetric activations, a CPU weight, float32/bfloat16 layers; called by
        layers/native_ops.select_kernels."""
        from tokenmill.quant.methods.gguf import GGUFWeight, kernels_for

        impl = self.impl
        if self.activation_zero_point or not isinstance(impl, Int8MMKernel):
            return False
        codes = impl.weight_t.t()  # [out, in], the stored codes
        if codes.device.type != "cpu" or not codes.is_contiguous():
            return False
        weight = GGUFWeight.w8a8_rows(codes, impl.weight_scale, self.smooth_inv)
        kernels = kernels_for(weight, layer.params_dtype)
        if kernels is None:
            return False
        self.impl = NativeW8A8Kernel(kernels, weight, impl)
        return True


class Int8MMKernel(LinearKernel):
    """int8 x int8 -> int32 through torch._int_mm (AVX-512 VNNI on CPU, IMMA on CUDA)."""

    name = "torch._int_mm"

    def __init__(self, qweight, activation_zero_point: bool) -> None:
        # _int_mm's right operand [in, out] as a transposed view of the [out, in] codes: the only
        # layout cuBLASLt's int8 GEMM takes, and on CPU as fast as a row-major copy (16-512 rows,
        # measured), so the CPU GEMV reads the same bytes
        codes = qweight.data.contiguous()
        self.weight_t = codes.t()
        self.weight_scale = qweight.scale.float().expand(qweight.shape[0]).contiguous()  # [out]
        self.weight_colsum = codes.to(torch.int32).sum(dim=1)  # [out]: zero-point correction
        self.activation_zero_point = activation_zero_point

    def __call__(self, x2):  # x2 [tokens, in] fp32, smoothed
        if self.activation_zero_point:
            xq, scale, zero = _per_token_asymmetric(x2)
        else:  # |x * 127 / amax| <= 127 up to rounding, so no clamp needed
            amax = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # [tokens, 1]
            xq, scale, zero = torch.round(x2 * (127.0 / amax)).to(torch.int8), amax / 127.0, None
        m = xq.shape[0]
        if xq.device.type == "cuda":  # cuBLASLt's int8 GEMM: more than 16 rows, a multiple of 8
            xq = F.pad(xq, (0, 0, 0, max(24, -(-m // 8) * 8) - m))
        acc = torch._int_mm(xq, self.weight_t)[:m]  # [tokens, out] int32, exact
        if zero is not None:
            acc = acc - zero.to(torch.int32) * self.weight_colsum  # q W^T - zero sum_k W: exact
        return (acc * self.weight_scale).mul_(scale)  # one pass to fp32, one in place


def _per_token_asymmetric(x2: torch.Tensor):
    """int8 codes, scale and zero point per token, x ~ scale * (q - zero), q in [-128, 127]: a
    skewed row (SiLU * up never goes below -0.28) gets the whole range, not half of it."""
    lo = x2.amin(dim=1, keepdim=True).clamp(max=0)  # [tokens, 1]; the range holds 0
    hi = x2.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) * (1.0 / 255.0)).clamp_(min=1e-12)
    zero = torch.round(-lo / scale) - 128.0
    return (torch.round(x2 / scale) + zero).clamp_(-128, 127).to(torch.int8), scale, zero


class NativeW8A8Kernel(LinearKernel):
    """1-8 rows: csrc/gguf.cpp's w8a8 GEMV over Int8MMKernel's codes (x quantized inside, with
    the smoothing factors); more rows, or a compiled graph: Int8MMKernel."""

    def __init__(self, kernels, weight, fallback: Int8MMKernel) -> None:
        from tokenmill.quant.methods.gguf import GEMV_ROWS

        self.kernels, self.w, self.fallback, self.gemv_rows = kernels, weight, fallback, GEMV_ROWS
        self.name = f"native w8a8: GEMV up to {GEMV_ROWS} rows, else {fallback.name}"

    def takes(self, x2: torch.Tensor) -> bool:
        return 0 < x2.shape[0] <= self.gemv_rows and not torch.compiler.is_compiling()

    def gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [1-8, in] unsmoothed -> fp32 [rows, out]."""
        return self.kernels.matmul(x2, self.w)

    def __call__(self, x2):  # x2 smoothed, fp32: the GEMM path
        return self.fallback(x2)

    def tensors(self):
        return self.fallback.tensors()
