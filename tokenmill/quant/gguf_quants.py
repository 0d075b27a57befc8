"""Dequantization of GGML (GGUF) block formats to float32, vectorized in torch: a format, so it
lives with the formats (models/gguf.py reads the files, quant/methods/gguf.py serves the codes).

Input: the raw bytes of a tensor as a uint8 tensor [rows, row_bytes], blocks laid along each row
(GGUF's fastest dimension). Output: float32 [rows, row_bytes / block_bytes * block_size].
The arithmetic (float32, same order of operations) matches the `gguf` package's reference
dequantization bit for bit; tests check it. Each format's layout is spelled out in shape comments.
"""

from __future__ import annotations

import torch

QK_K = 256  # elements per K-quant super-block

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
    30: ("BF16", 1, 2),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian IEEE half)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, count] bits 0..count-1."""
    word = qh.contiguous().view(torch.int32)  # [n, 1]
    shifts = torch.arange(count, dtype=torch.int32)
    return ((word >> shifts) & 1).to(torch.uint8)


def q8_0(b: torch.Tensor) -> torch.Tensor:  # [n, 34]: d f16, 32 x int8
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def q4_0(b: torch.Tensor) -> torch.Tensor:  # [n, 18]: d, 16 bytes of nibbles
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def q4_1(b: torch.Tensor) -> torch.Tensor:  # [n, 20]: d, m, 16 bytes of nibbles
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: torch.Tensor) -> torch.Tensor:  # [n, 22]: d, qh u32 (5th bits), 16 bytes of nibbles
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:  # [n, 24]: d, m, qh u32, 16 bytes of nibbles
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 12] packed 6-bit scales and mins of 8 sub-blocks -> ([n, 8], [n, 8])."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_dequant(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shared tail of Q4_K / Q5_K: q [n, 8, 32] -> d * sc * q - dmin * m."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def q4_k(b: torch.Tensor) -> torch.Tensor:  # [n, 144]: d, dmin, scales[12], qs[128]
    n = b.shape[0]
    qs = b[:, 16:].reshape(n, 4, 32)  # each 32 bytes hold two sub-blocks: low, then high nibbles
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    return _k_dequant(b, q)


def q5_k(b: torch.Tensor) -> torch.Tensor:  # [n, 176]: d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32)
    qs = b[:, 48:].reshape(n, 4, 32)
    ql = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    hi = (qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    return _k_dequant(b, ql | (hi << 4))


def q6_k(b: torch.Tensor) -> torch.Tensor:  # [n, 210]: ql[128], qh[64], scales i8[16], d f16
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    return (d * q.float()).reshape(n, QK_K)


_BLOCK_DEQUANT = {2: q4_0, 3: q4_1, 6: q5_0, 7: q5_1, 8: q8_0, 12: q4_k, 13: q5_k, 14: q6_k}
_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, any shape) of a tensor of `shape` (torch order) -> float32 tensor."""
    if ggml_type in _PLAIN:
        return raw.contiguous().view(_PLAIN[ggml_type]).float().reshape(shape)
    if ggml_type not in _BLOCK_DEQUANT:
        name = GGML_TYPES.get(ggml_type, (f"type {ggml_type}",))[0]
        supported = sorted(v[0] for v in GGML_TYPES.values())
        raise ValueError(f"GGUF tensor type {name} is not supported; supported: {supported}")
    _, _, block_bytes = GGML_TYPES[ggml_type]
    blocks = raw.reshape(-1, block_bytes)
    return _BLOCK_DEQUANT[ggml_type](blocks).reshape(shape)
