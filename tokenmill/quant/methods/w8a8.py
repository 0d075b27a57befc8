"""w8a8: int8 weights per channel x int8 activations per token (dynamic; symmetric, or with a
zero point per token corrected exactly in int32): torch._int_mm (AVX-512 VNNI on CPU, IMMA on
CUDA), int32 accumulators, one fp32 rescale."""

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
        return finish(self.impl(smooth_input(self.smooth_inv, rows(x))), x, layer.bias)


class Int8MMKernel(LinearKernel):
    """int8 x int8 -> int32 through torch._int_mm (AVX-512 VNNI on CPU, IMMA on CUDA)."""

    name = "torch._int_mm"

    def __init__(self, qweight, activation_zero_point: bool) -> None:
        # _int_mm's right operand [in, out]: row-major for the CPU kernel; on CUDA column-major
        # (a transposed view of the [out, in] codes), the only layout cuBLASLt's int8 GEMM takes
        codes = qweight.data.contiguous()
        self.weight_t = codes.t() if codes.is_cuda else codes.t().contiguous()
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
