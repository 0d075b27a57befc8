"""QuantMethod: the seam between a `Linear` and how its weight is stored and multiplied.

Every method creates a plain weight for the loader to fill from a 16/32-bit checkpoint and
quantizes it in `process_weights_after_loading`; `install` takes an already quantized weight
(a checkpoint written by `tokenmill quantize`), so both paths end in the same state. Methods know
nothing of models; formats (quant/formats.py) know nothing of layers. The methods themselves are
one file each beside this one; quant/methods/__init__.py is their registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from tokenmill.quant.formats import QuantizedTensor, cat_rows

# what calibrate.py leaves on a layer for quantizing it; dropped once it is quantized
CALIBRATION_STATS = ("input_amax", "input_mean_square", "input_samples", "input_hessian")


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


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
