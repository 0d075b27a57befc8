"""QuantMethod: the seam between a `Linear` and how its weight is stored and multiplied.

Every method creates a plain weight for the loader to fill from a 16/32-bit checkpoint and
quantizes it in `process_weights_after_loading`; `install` takes an already quantized weight
(a checkpoint written by `tokenmill quantize`), so both paths end in the same state. Methods know
nothing of models; formats (quant/formats.py) know nothing of layers. The methods themselves are
one file each beside this one; quant/methods/__init__.py is their registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.quant.formats import QuantizedTensor, cat_rows


@dataclass
class CalibrationStats:
    """What calibrate.py measured on a layer's inputs; dropped once the layer is quantized
    (the Hessians alone take 400 MB for the bundled model)."""

    input_amax: torch.Tensor  # [in] max |x_j|
    input_mean_square: torch.Tensor  # [in] E[x_j^2]
    input_samples: torch.Tensor | None = None  # [tokens / 16, in] sampled rows (alpha search)
    input_hessian: torch.Tensor | None = None  # [in, in] 2 X^T X / tokens (GPTQ, AWQ)


class LinearKernel(ABC):
    """One layer's matmul on one device, chosen once when the weight is installed: it holds
    the weight in the layout its kernel reads."""

    name: str = ""  # the path taken, for logs and benchmarks

    @abstractmethod
    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in] (already smoothed) -> y [tokens, out], before bias."""

    def tensors(self) -> list[torch.Tensor]:
        """What the kernel holds in memory (for model_bytes)."""
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]


def quantized_tensors(q: QuantizedTensor | None) -> list[torch.Tensor]:
    if q is None:
        return []
    return [t for t in (q.data, q.scale, q.zero_point, q.global_scale) if t is not None]


class QuantMethod(ABC):
    """Creates a layer's weight for loading, quantizes it once, applies it per call.

    One instance per layer: after `install` it owns that layer's quantized weight (`qweight`),
    input smoothing and kernel object; the layer holds nothing of it."""

    format: str = ""
    gptq: bool = False  # choose codes with GPTQ from calibration (gptq.py), else round to nearest
    # apply() is pure tensor code that torch.compile may trace (no Python state changing per call)
    compilable: bool = True
    # 512-token windows of calibration text (calibrate.py) for SmoothQuant, AWQ, GPTQ, search
    calibration_windows: int = 16
    calibration: CalibrationStats | None = None  # set by calibrate.py before quantizing
    qweight: QuantizedTensor | None = None  # the installed weight (codes may live in `impl`)
    input_smooth: torch.Tensor | None = None  # [in] fp32 s: the layer computes (x / s) (W s)^T
    smooth_inv: torch.Tensor | None = None  # [in] 1 / s, in the layout apply multiplies by
    impl: LinearKernel | None = None  # the kernel object chosen by install

    @property
    def kernel(self) -> str:
        """The path `apply` takes on this layer's device, for logs and benchmarks."""
        return self.impl.name if self.impl is not None else ""

    @property
    def wants_calibration(self) -> bool:
        """Whether calibrate.py should measure this layer's inputs."""
        return self.gptq

    @property
    def wants_hessian(self) -> bool:
        return self.gptq

    @property
    def wants_samples(self) -> bool:
        return False

    def create_weights(self, layer) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.params_dtype),
            requires_grad=False,
        )

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor) -> QuantizedTensor:
        """One float [out, in] checkpoint tensor -> its quantized form (round to nearest)."""

    def process_weights_after_loading(self, layer) -> None:
        if self.qweight is not None:
            return  # installed from a quantized checkpoint
        parts = self.quantize_shards(layer)
        del layer.weight
        self.install(layer, cat_rows(parts) if len(parts) > 1 else parts[0])
        self.calibration = None

    def quantize_shards(self, layer) -> list[QuantizedTensor]:
        """Each checkpoint tensor of a merged layer (q/k/v, gate/up) quantized on its own, as
        `tokenmill quantize` writes them, so both paths give bit-identical weights. With
        calibration, SmoothQuant (or AWQ) scales the input channels first."""
        weight = layer.weight.data
        stats = self.calibration
        hessian = stats.input_hessian if stats is not None and self.gptq else None
        smooth = self.smoothing(layer)
        if smooth is not None:
            self.input_smooth = smooth
            weight = weight.float() * smooth
            if hessian is not None:  # the inputs become x / s
                hessian = hessian / smooth[:, None] / smooth[None, :]
        parts = [self.quantize_weight(w) for w in weight.split(layer.output_sizes)]
        if getattr(self, "scale_search", False):
            from tokenmill.quant.scale_search import search_scales

            importance = stats.input_mean_square if stats is not None else None  # E[x^2]
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

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer's weight takes in memory: codes, scales, kernel layouts."""
        held = [t for t in (self.input_smooth, self.smooth_inv) if t is not None]
        held += quantized_tensors(self.qweight)
        return held + (self.impl.tensors() if self.impl is not None else [])

    def settle(self) -> None:
        """Called once the runner chose the kernels (layers/native_ops.select_kernels): drop
        any layout that no chosen kernel reads."""
        return None  # most methods hold one layout

    def set_input_smooth(self, s: torch.Tensor | None) -> None:
        """A quantized checkpoint's smoothing scales, before `install`."""
        self.input_smooth = None if s is None else s.float()

    @abstractmethod
    def install(self, layer, qweight: QuantizedTensor) -> None:
        """Take a quantized weight: keep it and choose the kernel object that `apply` calls."""

    @abstractmethod
    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through the installed weight."""

    def attach_native(self, layer) -> bool:
        """Switch to tokenmill's native CPU kernel where the method has one (weight-only
        nvfp4/mxfp4/fp8); called by layers/native_ops.select_kernels. False: kept as is."""
        return False


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
