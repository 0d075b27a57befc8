"""A KV cache in int8 or FP8 E4M3: one scale per token and KV head.

Storage per layer: codes [2, kv_heads, num_slots, head_dim] (int8 / float8_e4m3fn) and scales
[2, kv_heads, num_slots, 1] fp32, so a token costs head_dim + 4 bytes per head instead of
2 * head_dim in bf16. The scale is per token rather than per block: a block is written one
token at a time, and a per-block scale fixed by its first token would clip the later ones or
force requantizing the block. Attention always sees the dequantized values, in prefill too, so a
request gives the same logits whether its prompt was computed in one step, in chunks, or from a
prefix hit. On CPU int8 is the fast choice: int8 -> bf16 converts at ~0.15 ns/element, E4M3 ->
bf16 at ~2 ns (measured in BENCHMARKS.md, "KV cache dtype").
"""

from __future__ import annotations

import torch

from tokenmill.kv.storage.codes import KV_DTYPES, QMAX, SCALE_BYTES, STORAGE, dequantize, quantize
from tokenmill.layers.attention import TorchAttention

__all__ = ["KV_DTYPES", "QMAX", "STORAGE", "QuantizedKVAttention", "kv_bytes_per_element_and_token"]


def kv_bytes_per_element_and_token(kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int):
    """Bytes one token takes in one KV head, for K or V."""
    if kv_cache_dtype == "auto":
        return head_dim * model_dtype.itemsize
    return head_dim * KV_DTYPES[kv_cache_dtype].itemsize + SCALE_BYTES


class QuantizedKVAttention(TorchAttention):
    def __init__(self, scale: float, kv_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__(scale)
        self.kv_dtype = kv_dtype
        self.compute_dtype = compute_dtype

    def quantize(self, x: torch.Tensor):  # [kv_heads, n, dim] -> codes, scales [kv_heads, n, 1]
        return quantize(x, self.kv_dtype)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scales, self.kv_dtype, self.compute_dtype)

    def write(self, kv_cache, slots, k, v):
        codes, scales = kv_cache
        seen = []
        for i, x in enumerate((k, v)):
            c, s = self.quantize(x.transpose(0, 1))  # [kv_heads, n, dim]
            codes[i].index_copy_(1, slots, c)
            scales[i].index_copy_(1, slots, s)
            seen.append(self.dequantize(c, s).transpose(0, 1))
        return seen[0], seen[1]

    def gather_blocks(self, kv_cache, tables, block_size):
        codes, scales = kv_cache
        kvh, dim = codes.shape[1], codes.shape[-1]
        c = codes.view(2, kvh, -1, block_size * dim).index_select(2, tables)
        s = scales.view(2, kvh, -1, block_size).index_select(2, tables)
        kv = self.dequantize(c.view(2, kvh, -1, dim), s.view(2, kvh, -1, 1))
        return kv[0], kv[1]

    def gather_slots(self, kv_cache, slots):
        codes, scales = kv_cache
        kv = self.dequantize(codes.index_select(2, slots), scales.index_select(2, slots))
        return kv[0], kv[1]
