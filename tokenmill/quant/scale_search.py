"""Block-scale search: for block-scaled formats, the scale of each block chosen among its
neighbours on the scale grid to minimise the block's squared error, instead of amax / max.

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
# Not int4: its round-to-nearest never clips, and shrinking each group's range for the least
# weight MSE made the default model worse (+34.8% -> +41.9% perplexity, BENCHMARKS.md): without
# activation statistics the error measure cannot tell which columns matter.
SEARCHABLE = tuple(SCALE_CODES)


def search_scales(weight: torch.Tensor, q: QuantizedTensor) -> QuantizedTensor:
    """`q` (round-to-nearest of `weight` [rows, cols]) with each block's scale code replaced by
    the neighbour that gives the block the least squared error, and codes re-encoded on it. The
    round-to-nearest code is tried first and kept on ties."""
    if q.format not in SEARCHABLE:
        raise ValueError(f"scale search applies to {SEARCHABLE}, not {q.format}")
    w = weight.detach().double().reshape(q.data.shape[0], -1)
    best, best_err = q, None
    for cand in _code_candidates(q):
        err = _block_error(w, cand)
        if best_err is None:
            best, best_err = cand, err
            continue
        better = err < best_err  # [rows, blocks]
        best_err = torch.where(better, err, best_err)
        best = replace(best, scale=_pick(better, cand.scale, best.scale))
    return encode_with(best, w)


def _pick(better: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per block, scale code a where `better`, else b (E4M3 codes are selected as bytes)."""
    return torch.where(better, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)


def _code_candidates(q: QuantizedTensor):
    """Neighbouring scale codes on the format's scale grid (invalid ones stay at the base)."""
    deltas, top = SCALE_CODES[q.format]
    base = q.scale.view(torch.uint8).to(torch.int16)  # [rows, blocks]
    for d in sorted(deltas, key=abs):  # 0 first: the round-to-nearest scale
        cand = base + d
        valid = (cand >= 0) & (cand <= top) & (base != 0xFF)  # a NaN block keeps its scale
        codes = torch.where(valid, cand, base).to(torch.uint8)
        yield replace(q, scale=codes.view(q.scale.dtype) if q.scale.dtype != torch.uint8 else codes)


def _block_error(w: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """[rows, blocks] squared error of `w` coded on the scales of `q`."""
    diff = encode_with(q, w).dequantize(torch.float64).view_as(w) - w
    diff = torch.nan_to_num(diff, nan=0.0)
    return diff.pow(2).view(w.shape[0], -1, q.group_size).sum(-1)
