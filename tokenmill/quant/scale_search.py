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
SEARCHABLE = {
    "nvfp4": ((-2, -1, 0, 1, 2), 0x7E),  # E4M3 magnitude codes, 0x7E = 448
    "mxfp4": ((-1, 0, 1), 0xFE),  # E8M0 exponents, 0xFF is NaN
    "fp6_e3m2": ((-1, 0, 1), 0xFE),
    "fp6_e2m3": ((-1, 0, 1), 0xFE),
}


def search_scales(weight: torch.Tensor, q: QuantizedTensor) -> QuantizedTensor:
    """`q` (round-to-nearest of `weight` [rows, cols]) with each block's scale code moved to the
    neighbour that gives the block the least squared error, and codes re-encoded on it."""
    if q.format not in SEARCHABLE:
        raise ValueError(f"scale search applies to {tuple(SEARCHABLE)}, not {q.format}")
    deltas, top = SEARCHABLE[q.format]
    w = weight.detach().double().reshape(q.data.shape[0], -1)
    base = q.scale.view(torch.uint8).to(torch.int16)  # [rows, blocks]
    best_err = torch.full(base.shape, float("inf"), dtype=torch.float64, device=base.device)
    best = base.clone()
    for d in deltas:
        cand = base + d
        valid = (cand >= 0) & (cand <= top) & (base != 0xFF)  # a NaN block keeps its scale
        cand = torch.where(valid, cand, base)
        err = _block_error(w, q, cand.to(torch.uint8))
        err = torch.where(valid, err, torch.inf)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return encode_with(replace(q, scale=_as_scale(best.to(torch.uint8), q)), w)


def _as_scale(codes: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    return codes.view(q.scale.dtype) if q.scale.dtype != torch.uint8 else codes


def _block_error(w: torch.Tensor, q: QuantizedTensor, codes: torch.Tensor) -> torch.Tensor:
    """[rows, blocks] squared error of `w` coded on the scales `codes`."""
    cand = encode_with(replace(q, scale=_as_scale(codes, q)), w)
    diff = cand.dequantize(torch.float64).view_as(w) - w
    diff = torch.nan_to_num(diff, nan=0.0)
    return diff.pow(2).view(w.shape[0], -1, q.group_size).sum(-1)
