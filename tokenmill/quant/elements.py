"""Element codecs: small floats (FP8, FP6, FP4) and sub-byte packing.

A minifloat with `exponent_bits` E, `mantissa_bits` M and bias B has magnitude codes
`c = e << M | f`: subnormal `f * 2^(1 - B - M)` for e = 0, else `(1 + f / 2^M) * 2^(e - B)`.
Encoding rounds to nearest with ties to even and saturates at the format's largest finite value
(OCP FP8 "satfinite", and the only behaviour the MX element types have). NaN keeps its own code
where the format has one (E4M3 "fn": 0x7F, E5M2: 0x7F); the MX element types have none, so a NaN
must be caught at the block level (its E8M0 scale becomes NaN). Scaling lives in formats.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class MiniFloat:
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    num_finite: int  # magnitude codes 0..num_finite-1 are finite; above them inf/NaN
    nan_code: int | None  # magnitude code used for NaN, None if the format has no NaN

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_value(self) -> float:
        return float(magnitudes(self)[-1])

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value (the MX spec's emax_elem)."""
        return (self.num_finite - 1 >> self.mantissa_bits) - self.bias


E4M3 = MiniFloat("fp8_e4m3", 4, 3, 7, 127, 0x7F)  # OCP "fn": no inf, 0x7F/0xFF NaN, max 448
E5M2 = MiniFloat("fp8_e5m2", 5, 2, 15, 124, 0x7F)  # IEEE-like: 0x7C inf, max 57344
E3M2 = MiniFloat("fp6_e3m2", 3, 2, 3, 32, None)  # max 28
E2M3 = MiniFloat("fp6_e2m3", 2, 3, 1, 32, None)  # max 7.5
E2M1 = MiniFloat("fp4_e2m1", 2, 1, 1, 8, None)  # max 6: {0, .5, 1, 1.5, 2, 3, 4, 6}


@cache
def magnitudes(fmt: MiniFloat) -> torch.Tensor:
    """[num_finite] float64: the value of each finite magnitude code, ascending."""
    m = fmt.mantissa_bits
    values = []
    for code in range(fmt.num_finite):
        e, f = code >> m, code & ((1 << m) - 1)
        if e == 0:
            values.append(f * 2.0 ** (1 - fmt.bias - m))
        else:
            values.append((1 + f / 2**m) * 2.0 ** (e - fmt.bias))
    return torch.tensor(values, dtype=torch.float64)


def encode(x: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    """Any float tensor -> uint8 codes (sign in bit `bits - 1`), RNE, saturating."""
    a = x.double().abs()
    nan = torch.isnan(a)
    if nan.any() and fmt.nan_code is None:
        raise ValueError(f"{fmt.name} has no NaN; NaNs must be handled by the block scale")
    grid = magnitudes(fmt).to(a.device)
    min_exp = 1 - fmt.bias  # subnormals share the smallest normal's step
    _, exp = torch.frexp(torch.where(a > 0, a, 1.0))
    exp = torch.clamp(exp - 1, min=min_exp)  # floor(log2 a), exact from frexp
    step = torch.ldexp(torch.ones_like(a), exp - fmt.mantissa_bits)
    rounded = torch.round(a / step) * step  # torch.round is half-to-even; a / step is exact
    rounded = torch.clamp(torch.nan_to_num(rounded, nan=0.0), max=fmt.max_value)
    codes = torch.searchsorted(grid, rounded.contiguous())  # exact hits: `rounded` lies on the grid
    if fmt.nan_code is not None:
        codes = torch.where(nan, fmt.nan_code, codes)
    sign = torch.signbit(x).to(torch.int64) << (fmt.bits - 1)
    return (codes | sign).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: MiniFloat, dtype: torch.dtype = torch.float32):
    """uint8 codes -> values (NaN where the code is NaN, inf for E5M2's inf codes)."""
    table = decode_table(fmt).to(device=codes.device, dtype=dtype)
    return table[codes.long()]


@cache
def decode_table(fmt: MiniFloat) -> torch.Tensor:
    """[2^bits] float64: value of every code, both signs, NaN/inf included."""
    half = 1 << (fmt.bits - 1)
    mags = torch.full((half,), float("nan"), dtype=torch.float64)
    mags[: fmt.num_finite] = magnitudes(fmt)
    if fmt is E5M2:
        mags[0x7C] = float("inf")
    return torch.cat([mags, -mags])


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes < 16 -> [..., n / 2] bytes; element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def pack_6bit(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes < 64 -> [..., 3n / 4] bytes: four values little-endian in 24 bits."""
    if codes.shape[-1] % 4:
        raise ValueError(f"6-bit packing needs a last dimension divisible by 4, got {codes.shape}")
    c = codes.to(torch.int32).unflatten(-1, (-1, 4))
    word = c[..., 0] | c[..., 1] << 6 | c[..., 2] << 12 | c[..., 3] << 18
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1)
    return out.flatten(-2).to(torch.uint8)


def unpack_6bit(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int32).unflatten(-1, (-1, 3))
    word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16
    out = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1)
    return out.flatten(-2).to(torch.uint8)
