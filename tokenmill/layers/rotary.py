"""Rotary position embeddings (neox layout: the two halves of a head rotate together).

cos/sin are computed once in float32 exactly as `transformers` does, for every position up to
max_positions, and gathered by position per step. Scalings: default, linear, llama3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[index]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)  # type: ignore[arg-type]
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3")


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    native = None  # a native_ops.RowKernels, given by the runner on CPU

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        rotary_dim: int | None = None,
    ) -> None:
        """`rotary_dim` < head_dim: partial rotary (Bamba: the first half of each head turns,
        the rest passes through)."""
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = inv_frequencies(self.rotary_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [num_tokens, 1, head_dim] of the step's positions: once per step, shared
        by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(
            dtype
        )

    def apply(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate x [num_tokens, heads, head_dim] (q, k, or both side by side)."""
        if self.rotary_dim < x.shape[-1]:
            turned = self._rotate(x[..., : self.rotary_dim], cos_sin)
            return torch.cat([turned, x[..., self.rotary_dim :]], dim=-1)
        if not torch.compiler.is_compiling() and self.native is not None:
            out = self.native.rotary(x, *cos_sin)  # one pass, the same result (native_ops.py)
            if out is not None:
                return out
        return self._rotate(x, cos_sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = cos_sin
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
