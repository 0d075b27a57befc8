"""SmoothQuant for the methods that quantize activations (w8a8, fp8): the smoothing scales, their
installation and run-time division, and the migration strength chosen per layer
(`smoothquant_search`).

SmoothQuant (Xiao et al., 2023) divides input channel j by s_j = amax_x_j^alpha / amax_w_j^(1-alpha)
and multiplies the weight's column by it: the product is unchanged, activation outliers shrink,
and both sides become easier to quantize. One alpha for every layer is a compromise: q/k/v see
RMSNorm'd inputs, down_proj the heavy-tailed SiLU * up. Here each layer gets the alpha from
ALPHAS (0 = no smoothing included) whose quantized layer best reproduces the float one on
calibration tokens sampled from every window,

    || X W^T - Q_a(X / s) Q_w(W s)^T ||_F^2,

with Q_a the method's own per-token activation quantization and Q_w its per-channel weight
quantization, both computed as at run time (dequantized, in float64). The choice is made on the
calibration text (Hamlet), never on the evaluation text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

ALPHAS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smoothing_scale(input_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in_features] fp32 from activation and weight column maxima (SmoothQuant)."""
    w = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    s = input_amax.float().clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=1e-5)


def search_alpha(
    weight: torch.Tensor,  # [out, in]
    input_amax: torch.Tensor,  # [in]
    samples: torch.Tensor,  # [tokens, in] calibration inputs
    quantize_weight: Callable[[torch.Tensor], torch.Tensor],  # W -> dequantized Q_w(W)
    quantize_activation: Callable[[torch.Tensor], torch.Tensor],  # X -> dequantized Q_a(X)
) -> tuple[float, torch.Tensor | None, dict[float, float]]:
    """(alpha, s or None for alpha 0, the relative error ||dY||^2 / ||Y||^2 of every alpha)."""
    x = samples.double()
    w = weight.double()
    reference = x @ w.T
    norm = max(reference.pow(2).sum().item(), 1e-30)
    errors: dict[float, float] = {}
    best, best_s = 0.0, None
    for alpha in ALPHAS:
        s = smoothing_scale(input_amax, weight, alpha).double() if alpha else None
        xs, ws = (x, w) if s is None else (x / s, w * s)
        out = quantize_activation(xs) @ quantize_weight(ws).T
        errors[alpha] = (out - reference).pow(2).sum().item() / norm
        if errors[alpha] < errors[best]:
            best, best_s = alpha, s
    return best, None if best_s is None else best_s.float(), errors


def int8_per_token(x: torch.Tensor, zero_point: bool) -> torch.Tensor:
    """w8a8's activation quantization (methods.W8A8Method.apply), dequantized."""
    if zero_point:
        lo = x.amin(dim=1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 255.0).clamp(min=1e-12)
        zero = torch.round(-lo / scale) - 128.0
        return ((torch.round(x / scale) + zero).clamp(-128, 127) - zero) * scale
    amax = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.round(x * (127.0 / amax)) * (amax / 127.0)


class SmoothQuantMixin(ABC):
    """Input-channel smoothing for methods that quantize activations (calibrate.py); with
    `smoothquant_search`, alpha per layer. A method supplies `quantize_weight` (QuantMethod) and
    `fake_quantize_activation`."""

    smoothquant_alpha: float | None = None
    smoothquant_search: bool = False
    chosen_alpha: float | None = None  # with the search: the alpha this layer got
    chosen_error: float | None = None  # and its relative output error on calibration rows
    gptq: bool = False
    calibration = None  # CalibrationStats, set by calibrate.py (quant/methods/base.py)

    @property
    def wants_calibration(self) -> bool:
        return bool(self.smoothquant_alpha or self.smoothquant_search or self.gptq)

    @property
    def wants_samples(self) -> bool:
        return self.smoothquant_search

    def smoothing(self, layer) -> torch.Tensor | None:
        stats = self.calibration
        if stats is None:
            return None
        samples, stats.input_samples = stats.input_samples, None  # only the search reads them
        if self.smoothquant_search and samples is not None:
            alpha, s, errors = search_alpha(
                layer.weight.data,
                stats.input_amax,
                samples,
                lambda w: self.quantize_weight(w).dequantize().double(),  # type: ignore[attr-defined]
                self.fake_quantize_activation,
            )
            self.chosen_alpha, self.chosen_error = alpha, errors[alpha]
            return s
        if not self.smoothquant_alpha:
            return None
        return smoothing_scale(stats.input_amax, layer.weight.data, self.smoothquant_alpha)

    @abstractmethod
    def fake_quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] float64 -> its run-time activation quantization, dequantized."""


def smooth_input(smooth_inv: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor:
    """x / s in fp32 (identity without smoothing)."""
    return x2.float() if smooth_inv is None else x2 * smooth_inv  # promotes to fp32 in one pass


def inverse_smoothing(s: torch.Tensor | None) -> torch.Tensor | None:
    """1 / s [in_features] fp32, the factor smooth_input multiplies by."""
    return None if s is None else (1.0 / s.float()).contiguous()
