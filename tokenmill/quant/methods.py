"""Quant methods: what a `Linear` does with its weight, behind the quant-method seam.

Every method creates a plain weight for the loader to fill from a 16/32-bit checkpoint and
quantizes it in `process_weights_after_loading`; `install` takes an already quantized weight
(a checkpoint written by `tokenmill quantize`), so both paths end in the same state. Methods know
nothing of models; formats (formats.py) know nothing of layers.

Fast paths, each measured in BENCHMARKS.md, and where none exists the method says so in `kernel`:
  w8a8        int8 weights per channel x int8 activations per token (dynamic; symmetric, or
              with a zero point per token corrected exactly in int32): torch._int_mm (AVX-512
              VNNI on CPU, IMMA on CUDA), int32 accumulators, one fp32 rescale
  fp8         E4M3 weights per channel x E4M3 activations, "current" scaling (each token's amax)
              or "delayed" (one scale from the amax history of earlier steps, as Transformer Engine
              does): torch._scaled_mm on CUDA; on CPU, whose _scaled_mm is a slow reference
              (2.7 ms vs 0.03 ms bf16 for 576x1536), the same FP8 values go through bf16/fp32
              GEMMs: exact FP8 numerics, fp32 accumulation, no FP8 memory saving
  weight-only (weight_only.py): int8 _weight_int8pack_mm and int4 _weight_int4pack_mm_for_cpu
              (bf16 on CPU); nvfp4/mxfp4/fp8 native kernels on CPU (fp4_cpu.py); fp6
              and dtypes dequantize on the fly, then the GEMM
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant import elements as el
from tokenmill.quant.formats import (
    FORMATS,
    QuantizedTensor,
    cat_rows,
    quantize,
)
from tokenmill.quant.smoothquant import SmoothQuantMixin, install_smoothing, smooth_input

METHODS = ("w8a8", "fp8", *FORMATS)  # a bare format name means weight-only in that format
# what calibrate.py leaves on a layer for quantizing it; dropped once it is quantized
CALIBRATION_STATS = ("input_amax", "input_mean_square", "input_samples", "input_hessian")


def make_method(name: str, **options) -> QuantMethod:
    """'w8a8' | 'fp8' | a format name (weight-only), with method options."""
    windows = options.pop("calibration_windows", None)
    search = options.pop("smoothquant_search", False)
    method = _make(name, **options)
    if windows is not None:
        method.calibration_windows = int(windows)
    if search:
        if not isinstance(method, SmoothQuantMixin):
            raise ValueError(f"smoothquant_search applies to w8a8 and fp8, not {name!r}")
        method.smoothquant_search = True
    return method


def _make(name: str, **options) -> QuantMethod:
    if name == "w8a8":
        return W8A8Method(**options)
    if name == "fp8":
        return FP8Method(**options)
    if name in FORMATS:
        from tokenmill.quant.weight_only import WeightOnlyMethod

        return WeightOnlyMethod(name, **options)
    raise ValueError(f"unknown quantization {name!r}; known: {METHODS}")


class QuantMethod(ABC):
    """Creates a layer's weight for loading, quantizes it once, applies it per call."""

    format: str = ""
    kernel: str = ""  # the path `apply` takes on this layer's device, for logs and benchmarks
    gptq: bool = False  # choose codes with GPTQ from calibration (gptq.py), else round to nearest
    # apply() is pure tensor code that torch.compile may trace (no Python state changing per call)
    compilable: bool = True
    # 512-token windows of calibration text (calibrate.py) for SmoothQuant, AWQ, GPTQ, search
    calibration_windows: int = 16

    def create_weights(self, layer) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.params_dtype),
            requires_grad=False,
        )

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor) -> QuantizedTensor:
        """One float [out, in] checkpoint tensor -> its quantized form (round to nearest)."""

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "qweight", None) is not None:
            return  # installed from a quantized checkpoint
        parts = self.quantize_shards(layer)
        del layer.weight
        self.install(layer, cat_rows(parts) if len(parts) > 1 else parts[0])
        for name in CALIBRATION_STATS:  # Hessians alone: 400 MB for the bundled model
            if hasattr(layer, name):
                delattr(layer, name)

    def quantize_shards(self, layer) -> list[QuantizedTensor]:
        """Each checkpoint tensor of a merged layer (q/k/v, gate/up) quantized on its own, as
        `tokenmill quantize` writes them, so both paths give bit-identical weights. With
        calibration (`layer.input_amax`), SmoothQuant scales the input channels first."""
        weight = layer.weight.data
        hessian = getattr(layer, "input_hessian", None) if self.gptq else None
        smooth = self.smoothing(layer)
        if smooth is not None:
            layer.input_smooth = smooth
            weight = weight.float() * smooth
            if hessian is not None:  # the inputs become x / s
                hessian = hessian / smooth[:, None] / smooth[None, :]
        parts = [self.quantize_weight(w) for w in weight.split(layer.output_sizes)]
        if getattr(self, "scale_search", False):
            from tokenmill.quant.scale_search import search_scales

            importance = getattr(layer, "input_mean_square", None)  # E[x^2] per input channel
            if importance is not None and smooth is not None:
                importance = importance / smooth.float().pow(2)  # the inputs become x / s
            shards = weight.split(layer.output_sizes)
            parts = [search_scales(w, q, importance) for w, q in zip(shards, parts)]
        if hessian is not None:
            from tokenmill.quant.gptq import gptq

            parts = [gptq(w, hessian, q) for w, q in zip(weight.split(layer.output_sizes), parts)]
        return parts

    def smoothing(self, layer) -> torch.Tensor | None:
        return None

    @abstractmethod
    def install(self, layer, qweight: QuantizedTensor) -> None:
        """Put a quantized weight on `layer` in the layout `apply` reads."""

    @abstractmethod
    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through the installed weight."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


class W8A8Method(SmoothQuantMixin, QuantMethod):
    format = "int8"
    kernel = "torch._int_mm"

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
        # _int_mm's right operand [in, out]: row-major for the CPU kernel; on CUDA column-major
        # (a transposed view of the [out, in] codes), the only layout cuBLASLt's int8 GEMM takes
        codes = qweight.data.contiguous()
        layer.weight_t = codes.t() if codes.is_cuda else codes.t().contiguous()
        layer.qweight = replace(qweight, data=layer.weight_t.t())  # a view: stored once
        layer.weight_scale = qweight.scale.float().expand(qweight.shape[0]).contiguous()  # [out]
        layer.weight_colsum = codes.to(torch.int32).sum(dim=1)  # [out]: zero-point correction
        install_smoothing(layer)

    def apply(self, layer, x):
        x2 = smooth_input(layer, _rows(x))  # [tokens, in] fp32
        if self.activation_zero_point:
            xq, scale, zero = _per_token_asymmetric(x2)
        else:  # |x * 127 / amax| <= 127 up to rounding, so no clamp needed
            amax = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # [tokens, 1]
            xq, scale, zero = torch.round(x2 * (127.0 / amax)).to(torch.int8), amax / 127.0, None
        m = xq.shape[0]
        if xq.device.type == "cuda":  # cuBLASLt's int8 GEMM: more than 16 rows, a multiple of 8
            xq = F.pad(xq, (0, 0, 0, max(24, -(-m // 8) * 8) - m))
        acc = torch._int_mm(xq, layer.weight_t)[:m]  # [tokens, out] int32, exact
        if zero is not None:
            acc = acc - zero.to(torch.int32) * layer.weight_colsum  # q W^T - zero sum_k W: exact
        y = (acc * layer.weight_scale).mul_(scale)  # one pass to fp32, one in place
        return _finish(y, x, layer.bias)


def _per_token_asymmetric(x2: torch.Tensor):
    """int8 codes, scale and zero point per token, x ~ scale * (q - zero), q in [-128, 127]: a
    skewed row (SiLU * up never goes below -0.28) gets the whole range, not half of it."""
    lo = x2.amin(dim=1, keepdim=True).clamp(max=0)  # [tokens, 1]; the range holds 0
    hi = x2.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) * (1.0 / 255.0)).clamp_(min=1e-12)
    zero = torch.round(-lo / scale) - 128.0
    return (torch.round(x2 / scale) + zero).clamp_(-128, 127).to(torch.int8), scale, zero


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
        layer.qweight = qweight
        layer.weight_scale = qweight.scale.float().expand(qweight.shape[0]).contiguous()
        layer.amax_history = AmaxHistory(self.amax_history_len)
        install_smoothing(layer)
        dev = qweight.data.device
        if dev.type == "cuda":
            self.kernel = "torch._scaled_mm"
            layer.weight_fp8 = qweight.data
        else:
            from tokenmill.layers.linear import pack_for_cpu

            self.kernel = "emulated: FP8 values in bf16/fp32 GEMMs (no fast FP8 GEMM on CPU)"
            values = qweight.data.to(layer.params_dtype)  # exact: E4M3 fits in bf16 and fp32
            layer.weight_packed = pack_for_cpu(values)
            if layer.weight_packed is None:
                layer.weight_values = values
            layer.qweight = replace(qweight, data=qweight.data[:0])  # codes live on as values

    def activation_scale(self, layer, x2: torch.Tensor) -> torch.Tensor:  # [tokens, 1] fp32
        amax = x2.abs().amax(dim=1, keepdim=True).float()
        if self.activation_scaling == "current":
            return (amax / el.E4M3.max_value).clamp_(min=1e-12)
        scale = layer.amax_history.scale(amax.max(), el.E4M3.max_value)
        return scale.expand(x2.shape[0], 1)

    def apply(self, layer, x):
        x2 = smooth_input(layer, _rows(x))  # [tokens, in] fp32
        scale = self.activation_scale(layer, x2)
        limit = el.E4M3.max_value  # delayed scales can be stale: saturate, as the format does
        xq = (x2 / scale).clamp_(-limit, limit).to(torch.float8_e4m3fn)
        if hasattr(layer, "weight_fp8"):
            from tokenmill.quant.scaled_mm import scaled_mm_rowwise

            y = scaled_mm_rowwise(xq, layer.weight_fp8, scale, layer.weight_scale, x.dtype)
            return _finish(y, x, layer.bias)
        from tokenmill.layers.linear import packed_linear

        xv = xq.to(layer.params_dtype)
        packed = layer.weight_packed
        acc = packed_linear(xv, packed) if packed is not None else F.linear(xv, layer.weight_values)
        y = acc.float().mul_(scale).mul_(layer.weight_scale)
        return _finish(y, x, layer.bias)
