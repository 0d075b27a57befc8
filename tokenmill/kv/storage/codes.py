"""Per-token KV codes: int8 or FP8 E4M3 with one float32 scale per token and head (absmax).

Shared by the quantized KV cache (layers/kv_quant.py) and the compressed KV tiers (host.py), so
a block compressed for a tier is coded exactly as the cache would code it.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Tensor dtype of the codes: torch has no CPU index_copy_ for float8, so FP8 codes live as bytes.
STORAGE = {torch.int8: torch.int8, torch.float8_e4m3fn: torch.uint8}
SCALE_BYTES = 4


def quantize(x: torch.Tensor, kv_dtype: torch.dtype):  # [..., dim] -> codes, scales [..., 1]
    """One scale per row of the last dimension (a token of one head): absmax / QMAX."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / QMAX[kv_dtype]
    y = x / scale
    if kv_dtype == torch.int8:
        return torch.round(y).to(torch.int8), scale
    return y.to(kv_dtype).view(torch.uint8), scale  # stored as bytes: see STORAGE


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kv_dtype, out_dtype) -> torch.Tensor:
    if kv_dtype != torch.int8:
        codes = codes.view(kv_dtype)
    return (codes.to(torch.float32) * scales).to(out_dtype)
