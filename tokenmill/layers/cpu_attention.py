"""Decode attention on CPU read in place from the paged KV pool (`csrc/paged_attention.cpp`).

The torch backend gathers every decode's blocks into a contiguous copy before SDPA: at batch 64
that copy moves as many bytes per step as the weights do. The native kernel walks each
sequence's block table instead and reads K and V where they lie, with an online softmax, one
work item per (sequence, KV head) over torch's OpenMP threads. The KV write is one native call
of row copies too. Prefill attention and every dtype or layout the kernels do not take (float16,
a quantized cache) stay on the torch code.
"""

from __future__ import annotations

import ctypes

import torch

from tokenmill.layers import native
from tokenmill.layers.attention import AttentionMetadata, TorchAttention

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR] * 5 + [_I64] * 7 + [ctypes.c_float, ctypes.c_int]


def _kernels() -> dict:
    """dtype -> decode kernel, and "write" -> the KV write (any dtype)."""
    lib = native.load("paged_attention")
    fns = {torch.float32: lib.tm_paged_decode_f32, torch.bfloat16: lib.tm_paged_decode_bf16}
    for fn in fns.values():
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    lib.tm_kv_write.argtypes = [_PTR] * 4 + [_I64] * 7 + [ctypes.c_int]
    lib.tm_kv_write.restype = ctypes.c_int
    return {**fns, "write": lib.tm_kv_write}


class NativeCpuAttention(TorchAttention):
    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.kernels = _kernels()

    @staticmethod
    def load() -> None:
        """Build and load the kernels now (raises native.NativeUnavailable where they cannot)."""
        _kernels()

    def write(self, kv_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """As the torch backend's, in one call: row copies instead of two index_copy_."""
        n, heads, dim = k.shape
        if not (
            isinstance(kv_cache, torch.Tensor)
            and kv_cache.is_contiguous()
            and k.dtype == v.dtype == kv_cache.dtype
            and k.shape == v.shape
            and k.stride()[1:] == v.stride()[1:] == (dim, 1)
            and slots.dtype == torch.int64
            and slots.is_contiguous()
        ):
            return super().write(kv_cache, slots, k, v)
        num_slots = kv_cache.shape[2]
        bad = self.kernels["write"](
            k.data_ptr(),
            v.data_ptr(),
            kv_cache.data_ptr(),
            slots.data_ptr(),
            n,
            heads,
            dim,
            num_slots,
            k.stride(0),
            v.stride(0),
            k.element_size(),
            torch.get_num_threads(),
        )
        if bad:
            raise IndexError(f"a KV slot outside [0, {num_slots}) was not written")
        return k, v

    def _decode(self, q: torch.Tensor, kv_cache, meta: AttentionMetadata):
        fn = self.kernels.get(q.dtype)
        tables, lens = meta.decode_block_tables, meta.decode_lens
        if (
            fn is None
            or lens is None
            or tables is None
            or not isinstance(kv_cache, torch.Tensor)
            or kv_cache.dtype != q.dtype
            or not kv_cache.is_contiguous()
        ):
            return super()._decode(q, kv_cache, meta)
        q = q.contiguous()
        out = torch.empty_like(q)
        num_seqs, num_heads, head_dim = q.shape
        rc = fn(
            q.data_ptr(),
            kv_cache.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            out.data_ptr(),
            num_seqs,
            num_heads,
            kv_cache.shape[1],
            head_dim,
            kv_cache.shape[2],
            meta.block_size,
            tables.shape[1],
            self.scale,
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"paged decode kernel rejected its arguments (code {rc})")
        return out
