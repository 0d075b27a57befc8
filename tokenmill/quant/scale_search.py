"""Block-scale search: for block-scaled formats, the scale of each block chosen among its
neighbours on the scale grid to minimise the block's squared error, instead of amax / max; for
int4, each group's range shrunk by the factor that minimises its error. With calibration the
error of each input channel is weighted by E[x^2] of that channel (what the layer's output feels).

Round-to-nearest takes the smallest scale that fits the block's largest value (for MX, the OCP
rule, which may even clip it). A slightly smaller scale can serve the other 15 or 31 elements
better; a larger one can stop the clipping. Every candidate is still a valid scale code of the
format (E4M3 for nvfp4, E8M0 for the MX formats), so layouts, checkpoints and kernels are those
of round-to-nearest; only which codes are stored changes. GPTQ (gptq.py) keeps the scales it is
given, so the two compose: search the scales, then choose codes with error feedback.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tokenmill.quant.formats import QuantizedTensor, encode_with

# format -> (neighbouring scale codes tried, largest valid scale code)
SCALE_CODES = {
    "nvfp4": ((-2, -1, 0, 1, 2), 0x7E),  # E4M3 magnitude codes, 0x7E = 448
    "mxfp4": ((-1, 0, 1), 0xFE),  # E8M0 exponents, 0xFF is NaN
    "fp6_e3m2": ((-1, 0, 1), 0xFE),
    "fp6_e2m3": ((-1, 0, 1), 0xFE),
}
# int4 (fp32 scale and zero point per group): the group's range shrunk by these factors, so its
# extreme values clip in exchange for a finer step for the rest, as AWQ's clipping search does.
# Only with activation statistics: by weight error alone it made the default model worse.
INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
SEARCHABLE = (*SCALE_CODES, "int4")


def search_scales(
    weight: torch.Tensor, q: QuantizedTensor, importance: torch.Tensor | None = None
) -> QuantizedTensor:
    """`q` (round-to-nearest of `weight` [rows, cols]) with each block's scale (int4: and zero
    point) replaced by the candidate with the least squared error, and codes re-encoded on it.
    `importance` [cols] (E[x^2] of each input channel, from calibration) weights the error, so it
    approximates the error of the layer's output; int4 requires it. The round-to-nearest scale is
    tried first and kept on ties."""
    if q.format not in SEARCHABLE:
        raise ValueError(f"scale search applies to {SEARCHABLE}, not {q.format}")
    if q.format == "int4" and importance is None:
        raise ValueError("int4 scale search needs activation statistics (calibration)")
    w = weight.detach().double().reshape(q.data.shape[0], -1)
    col = None if importance is None else importance.double().to(w.device)[None, :]
    candidates = _int4_candidates(w, q) if q.format == "int4" else _code_candidates(q)
    best, best_err = q, None
    for cand in candidates:
        err = _block_error(w, cand, col)
        if best_err is None:
            best, best_err = cand, err
            continue
        better = err < best_err  # [rows, blocks]
        best_err = torch.where(better, err, best_err)
        zero = cand.zero_point
        best = replace(
            best,
            scale=_pick(better, cand.scale, best.scale),
            zero_point=None if zero is None else _pick(better, zero, best.zero_point),
        )
    return encode_with(best, w)


def _pick(better: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per block, a where `better`, else b (E4M3 codes are selected as bytes)."""
    if a.dtype.is_floating_point and a.dtype.itemsize == 1:
        return torch.where(better, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)
    return torch.where(better, a, b)


def _code_candidates(q: QuantizedTensor):
    """Neighbouring scale codes on the format's scale grid (invalid ones stay at the base)."""
    deltas, top = SCALE_CODES[q.format]
    base = q.scale.view(torch.uint8).to(torch.int16)  # [rows, blocks]
    for d in sorted(deltas, key=abs):  # 0 first: the round-to-nearest scale
        cand = base + d
        valid = (cand >= 0) & (cand <= top) & (base != 0xFF)  # a NaN block keeps its scale
        codes = torch.where(valid, cand, base).to(torch.uint8)
        yield replace(q, scale=codes.view(q.scale.dtype) if q.scale.dtype != torch.uint8 else codes)


def _int4_candidates(w: torch.Tensor, q: QuantizedTensor):
    """int4 groups with their range shrunk, in formats.py's int4 arithmetic (factor 1 = RTN)."""
    g = w.view(w.shape[0], -1, q.group_size)
    for a in INT4_SHRINK:
        if q.zero_point is None:
            scale = (g.abs().amax(-1) * a / 7).float()
            yield replace(q, scale=torch.where(scale > 0, scale, torch.ones_like(scale)))
            continue
        lo, hi = g.amin(-1).clamp(max=0) * a, g.amax(-1).clamp(min=0) * a
        scale = ((hi - lo) / 15).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale.double()).clamp(0, 15).to(torch.uint8)
        yield replace(q, scale=scale, zero_point=zero)


def _block_error(w: torch.Tensor, q: QuantizedTensor, col: torch.Tensor | None) -> torch.Tensor:
    """[rows, blocks] squared error of `w` coded on the scales of `q`, columns weighted by col."""
    diff = encode_with(q, w).dequantize(torch.float64).view_as(w) - w
    err = torch.nan_to_num(diff, nan=0.0).pow(2)
    if col is not None:
        err = err * col
    return err.view(w.shape[0], -1, q.group_size).sum(-1)
