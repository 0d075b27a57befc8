"""Quantized formats: scaling + element codes + packing, behind `quantize` and `QuantizedTensor`.

A tensor is seen as rows along its last dimension (`[rows, cols]`; a weight is `[out, in]`, an
activation `[tokens, hidden]`). Scales cover the whole tensor, one row ("channel" for a weight,
"token" for an activation: the same arithmetic), or a block of `group_size` along a row.

  int8      symmetric, codes in [-127, 127], fp32 scale = amax / 127 (default: per row)
  int4      groups of 128 (or 32/64), asymmetric with a uint8 zero point (default) or symmetric
            in [-8, 7]; two codes per byte, element 2i in the low nibble
  fp8_e4m3  OCP E4M3 "fn" (max 448) / E5M2 (max 57344), fp32 scale = amax / max (default per row)
  fp8_e5m2
  fp6_e3m2  OCP MX: 32-element blocks, E8M0 power-of-two scale, four codes in three bytes
  fp6_e2m3
  mxfp4     OCP MX: E2M1 codes, 32-element blocks, E8M0 scale
  nvfp4     E2M1 codes, 16-element blocks with an E4M3 scale, times one fp32 scale per tensor

The arithmetic is float64 so that codes are exactly those of the format's definition (tests check
them against an independent float64 reference); methods.py has the fast runtime paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from tokenmill.config_quant import FORMATS  # defined once, in the (torch-free) config
from tokenmill.quant import elements as el

MINIFLOATS = {"fp8_e4m3": el.E4M3, "fp8_e5m2": el.E5M2, "fp6_e3m2": el.E3M2, "fp6_e2m3": el.E2M3}
MX = {"fp6_e3m2": el.E3M2, "fp6_e2m3": el.E2M3, "mxfp4": el.E2M1}

GRANULARITIES = ("tensor", "channel", "token")
NVFP4_BLOCK, MX_BLOCK = 16, 32
E8M0_NAN = 0xFF


@dataclass
class QuantizedTensor:
    format: str
    shape: tuple[int, ...]  # the original shape
    data: torch.Tensor  # codes: int8 [rows, cols], float8 [rows, cols], or packed uint8 bytes
    scale: torch.Tensor  # fp32 [] / [rows] / [rows, groups]; uint8 E8M0 or float8 E4M3 blocks
    zero_point: torch.Tensor | None = None  # int4 asymmetric: uint8 [rows, groups]
    global_scale: torch.Tensor | None = None  # nvfp4: fp32 [] or [rows] (rows of merged shards)
    group_size: int | None = None  # elements per scale along a row, None for tensor/row scales
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """True storage: codes and every scale."""
        parts = (self.data, self.scale, self.zero_point, self.global_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self).to(dtype).view(self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            data=move(self.data),
            scale=move(self.scale),
            zero_point=move(self.zero_point),
            global_scale=move(self.global_scale),
        )


def quantize(
    x: torch.Tensor,
    format: str,
    *,
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = False,
) -> QuantizedTensor:
    """Quantize `x` to `format` (see the module docstring for defaults and layouts).

    `granularity` applies to int8 and fp8 ("tensor", or one scale per row: "channel"/"token");
    `group_size` to int4 (32/64/128, default 128); `symmetric` to int4.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {FORMATS}")
    if not x.is_floating_point():
        raise TypeError(f"quantize takes a float tensor, got {x.dtype}")
    rows = x.detach().double().reshape(-1, x.shape[-1] if x.dim() else 1)
    shape = tuple(x.shape)
    if format == "int8":
        return _int8(rows, shape, granularity)
    if format == "int4":
        return _int4(rows, shape, group_size or 128, symmetric)
    if format == "nvfp4":
        return _nvfp4(rows, shape)
    if format in MX:
        return _mx(rows, shape, format)
    return _fp8(rows, shape, format, granularity)


def _row_amax(rows: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if torch.isnan(rows).any():
        raise ValueError("cannot take a scale of a tensor holding NaN")
    if granularity == "tensor":
        return rows.abs().amax()
    return rows.abs().amax(dim=1)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (all-zero rows) becomes 1, so codes are 0 and no division by zero happens."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _broadcast(scale: torch.Tensor) -> torch.Tensor:
    return scale if scale.dim() == 0 else scale[:, None]


def _int8(rows, shape, granularity) -> QuantizedTensor:
    scale = _safe((_row_amax(rows, granularity) / 127).float())
    codes = torch.round(rows / _broadcast(scale).double()).clamp(-127, 127).to(torch.int8)
    return QuantizedTensor("int8", shape, codes, scale)


def _fp8(rows, shape, format, granularity) -> QuantizedTensor:
    fmt = MINIFLOATS[format]
    scale = _safe((_row_amax(rows, granularity) / fmt.max_value).float())
    codes = el.encode(rows / _broadcast(scale).double(), fmt)
    dtype = torch.float8_e4m3fn if fmt is el.E4M3 else torch.float8_e5m2
    return QuantizedTensor(format, shape, codes.view(dtype), scale)


def _groups(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, cols] -> [rows, cols / group, group]."""
    if rows.shape[1] % group_size:
        raise ValueError(
            f"rows of {rows.shape[1]} elements do not split into groups of {group_size}; "
            "pick a group size that divides the last dimension"
        )
    return rows.view(rows.shape[0], -1, group_size)


def _int4(rows, shape, group_size, symmetric) -> QuantizedTensor:
    if group_size not in (32, 64, 128):
        raise ValueError(f"int4 group_size must be 32, 64 or 128, got {group_size}")
    g = _groups(rows, group_size)
    if symmetric:
        scale = _safe((g.abs().amax(-1) / 7).float())  # [rows, groups]
        q = torch.round(g / scale[..., None].double()).clamp(-8, 7) + 8
        zero = None
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # zero stays exact
        scale = _safe(((hi - lo) / 15).float())
        zero = torch.round(-lo / scale.double()).clamp(0, 15)
        q = (torch.round(g / scale[..., None].double()) + zero[..., None]).clamp(0, 15)
        zero = zero.to(torch.uint8)
    packed = el.pack_4bit(q.to(torch.uint8).flatten(1))
    return QuantizedTensor("int4", shape, packed, scale, zero, group_size=group_size)


def _mx(rows, shape, format) -> QuantizedTensor:
    fmt = MX[format]
    g = _groups(rows, MX_BLOCK)
    amax = g.abs().amax(-1)  # [rows, blocks]; NaN if the block holds one
    _, exp = torch.frexp(torch.where(amax > 0, amax, 1.0))
    shared = torch.where(amax > 0, exp - 1 - fmt.emax, -127).clamp(-127, 127)
    nan_block = torch.isnan(amax)
    scale = torch.where(nan_block, E8M0_NAN, shared + 127).to(torch.uint8)
    elems = torch.ldexp(g, -shared[..., None])  # exact: a power-of-two scale
    codes = el.encode(torch.nan_to_num(elems, nan=0.0), fmt).flatten(1)
    packed = el.pack_4bit(codes) if fmt.bits == 4 else el.pack_6bit(codes)
    return QuantizedTensor(format, shape, packed, scale, group_size=MX_BLOCK)


def _nvfp4(rows, shape) -> QuantizedTensor:
    if torch.isnan(rows).any():
        raise ValueError("nvfp4 cannot represent NaN")
    amax = rows.abs().amax()
    e4m3_max, e2m1_max = el.E4M3.max_value, el.E2M1.max_value
    global_scale = _safe((amax / (e4m3_max * e2m1_max)).float())  # decode scale, fp32
    g = _groups(rows, NVFP4_BLOCK)
    block = g.abs().amax(-1) / e2m1_max / global_scale.double()  # [rows, blocks], <= 448
    block_codes = el.encode(block, el.E4M3)
    block_scale = el.decode(block_codes, el.E4M3, torch.float64)
    denom = (block_scale * global_scale.double())[..., None]
    elems = torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), 0.0)
    packed = el.pack_4bit(el.encode(elems, el.E2M1).flatten(1))
    scale = block_codes.view(torch.float8_e4m3fn)
    return QuantizedTensor("nvfp4", shape, packed, scale, None, global_scale, NVFP4_BLOCK)


def element_values(q: QuantizedTensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[rows, cols] values of the codes before scaling (int4: code minus zero point); every
    value is exact in float32 as well."""
    if q.format == "int8":
        return q.data.to(dtype)
    if q.format in ("fp8_e4m3", "fp8_e5m2"):
        return el.decode(q.data.view(torch.uint8), MINIFLOATS[q.format], dtype)
    if q.format == "int4":
        codes = el.unpack_4bit(q.data).to(dtype).view(q.data.shape[0], -1, q.group_size)
        offset = q.zero_point.to(dtype)[..., None] if q.zero_point is not None else 8.0
        return (codes - offset).flatten(1)
    fmt = el.E2M1 if q.format in ("mxfp4", "nvfp4") else MX[q.format]
    codes = el.unpack_4bit(q.data) if fmt.bits == 4 else el.unpack_6bit(q.data)
    return el.decode(codes, fmt, dtype)


def expanded_scale(q: QuantizedTensor) -> torch.Tensor:
    """Float64 scale broadcastable to [rows, cols / group, group] (or [rows, cols])."""
    if q.format in MX:
        exp = q.scale.to(torch.int64) - 127
        s = torch.where(q.scale == E8M0_NAN, torch.nan, torch.ldexp(torch.ones_like(exp), exp))
        return s.double()[..., None]
    if q.format == "nvfp4":
        block = el.decode(q.scale.view(torch.uint8), el.E4M3, torch.float64)
        assert q.global_scale is not None
        return (block * _broadcast(q.global_scale.double()))[..., None]
    if q.group_size is not None:
        return q.scale.double()[..., None]
    return _broadcast(q.scale.double())


def _dequantize(q: QuantizedTensor) -> torch.Tensor:
    values = element_values(q)
    scale = expanded_scale(q)
    if q.group_size is not None:
        return (values.view(values.shape[0], -1, q.group_size) * scale).flatten(1)
    return values * scale


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack 2-D quantized tensors along rows (a merged q/k/v or gate/up weight).

    Per-tensor scales become per-row, so each part keeps its own scale exactly.
    """
    first = parts[0]
    for p in parts:
        if (p.format, p.group_size, p.shape[1:]) != (
            first.format,
            first.group_size,
            first.shape[1:],
        ):
            raise ValueError("cat_rows needs parts of one format, group size and row length")

    def per_row(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        return None if t is None else (t.expand(rows) if t.dim() == 0 else t)

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

    rows = [p.shape[0] for p in parts]
    return QuantizedTensor(
        first.format,
        (sum(rows), *first.shape[1:]),
        torch.cat([p.data for p in parts]),
        cat([per_row(p.scale, r) for p, r in zip(parts, rows)]),  # type: ignore[arg-type]
        cat([p.zero_point for p in parts]),
        cat([per_row(p.global_scale, r) for p, r in zip(parts, rows)]),
        first.group_size,
    )


def encode_with(q: QuantizedTensor, x: torch.Tensor) -> QuantizedTensor:
    """`x` [rows, cols] coded on the scales (and zero points) of `q`: same layout, new codes.
    Values beyond a scale's range saturate, as the format does."""
    rows = x.detach().double().reshape(q.data.shape[0], -1)
    scale = expanded_scale(q)
    if q.group_size is not None:
        rows = rows.view(rows.shape[0], -1, q.group_size)
    y = torch.where(scale > 0, rows / torch.where(scale > 0, scale, 1.0), 0.0)
    if q.format == "int8":
        return replace(q, data=torch.round(y).clamp(-127, 127).to(torch.int8).view(q.data.shape))
    if q.format == "int4":
        zero = q.zero_point.double()[..., None] if q.zero_point is not None else 8.0
        codes = (torch.round(y) + zero).clamp(0, 15).to(torch.uint8).flatten(1)
        return replace(q, data=el.pack_4bit(codes))
    if q.format in MINIFLOATS and q.format not in MX:
        codes = el.encode(y, MINIFLOATS[q.format])
        return replace(q, data=codes.view(q.data.dtype).view(q.data.shape))
    fmt = MX.get(q.format, el.E2M1)
    codes = el.encode(torch.nan_to_num(y, nan=0.0), fmt).flatten(1)
    return replace(q, data=el.pack_4bit(codes) if fmt.bits == 4 else el.pack_6bit(codes))


def take_rows(q: QuantizedTensor, index: torch.Tensor) -> QuantizedTensor:
    """Rows `index` of a 2-D quantized tensor, still quantized (codes, and each row's scales;
    a per-tensor scale is shared): what an embedding lookup reads of a quantized table."""

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.dim() == 0 else t.index_select(0, index)

    if len(q.shape) != 2:
        raise ValueError(f"take_rows needs a 2-D quantized tensor, got shape {q.shape}")
    return replace(
        q,
        shape=(index.numel(), q.shape[1]),
        data=q.data.index_select(0, index),
        scale=rows(q.scale),  # type: ignore[arg-type]
        zero_point=rows(q.zero_point),
        global_scale=rows(q.global_scale),
    )


def take_cols(q: QuantizedTensor, start: int, length: int) -> QuantizedTensor:
    """Columns [start, start + length) of a 2-D quantized tensor, still quantized (a
    row-parallel rank's share of the input): codes (packed bytes cut at whole bytes), the
    groups' scales and zero points; per-tensor and per-row scales are shared. A ValueError when
    the cut falls inside a scale group or a packed byte."""
    if len(q.shape) != 2:
        raise ValueError(f"take_cols needs a 2-D quantized tensor, got shape {q.shape}")
    cols = q.shape[1]
    if q.group_size is not None and (start % q.group_size or length % q.group_size):
        raise ValueError(
            f"{q.format} groups of {q.group_size} do not divide a shard of {length} of {cols} "
            "input columns; choose a tensor_parallel_size (or group size) whose shards hold "
            "whole groups"
        )
    per_byte = q.data.shape[1] / cols  # 1 (int8, fp8), 0.5 (4-bit), 0.75 (6-bit)
    lo, n = start * per_byte, length * per_byte
    if lo != int(lo) or n != int(n):
        raise ValueError(f"{q.format}: a shard of {length} columns from {start} cuts a packed byte")  # fmt: skip

    def groups(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dim() < 2 or q.group_size is None:
            return t  # per tensor or per row
        return t.narrow(1, start // q.group_size, length // q.group_size)

    return replace(
        q,
        shape=(q.shape[0], length),
        data=q.data.narrow(1, int(lo), int(n)),
        scale=groups(q.scale),  # type: ignore[arg-type]
        zero_point=groups(q.zero_point),
    )


def dequantize_fast(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, in fp32 arithmetic (formats.py's float64 path is the reference)."""
    values = element_values(q, torch.float32)
    scale = expanded_scale(q).float()
    if q.group_size is not None:
        values = values.view(values.shape[0], -1, q.group_size) * scale
        return values.flatten(1).to(dtype)
    return (values * scale).to(dtype)
