"""GPTQ (Frantar et al., 2022): choose a layer's codes column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs (H = 2 X^T X over calibration tokens), so the layer's *outputs* stay close.

The scales are fixed first, exactly as round-to-nearest computes them from the float weight
(AutoGPTQ's `static_groups`); GPTQ only picks different codes on that grid. The result is
therefore an ordinary QuantizedTensor of the same format and layout, and every kernel, checkpoint
and test of the format applies unchanged. Any format works: each column is rounded onto its own
grid (`Grid`).
"""

from __future__ import annotations

import torch

from tokenmill.quant import elements as el
from tokenmill.quant.formats import (
    MINIFLOATS,
    MX,
    QuantizedTensor,
    encode_with,
    expanded_scale,
)


class Grid:
    """Per-element scale (and int4 zero point) of a quantized weight, for rounding any column."""

    def __init__(self, q: QuantizedTensor) -> None:
        rows, cols = q.shape[0], q.shape[-1]
        self.q = q
        s = expanded_scale(q)  # [rows, groups, 1], [rows, 1] or []
        if q.group_size:
            s = s.expand(rows, -1, q.group_size).reshape(rows, cols)
        self.scale = s.expand(rows, cols).float()
        self.zero = None
        if q.format == "int4":
            zp = q.zero_point.float() if q.zero_point is not None else None
            zero = zp if zp is not None else torch.full_like(q.scale.float(), 8.0)
            self.zero = zero[..., None].expand(-1, -1, q.group_size).reshape(rows, cols)

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:  # [rows] -> grid values [rows]
        s = self.scale[:, col]
        safe = torch.where(s > 0, s, 1.0)
        y = w / safe
        fmt = self.q.format
        if fmt == "int8":
            v = torch.round(y).clamp(-127, 127)
        elif fmt == "int4":
            assert self.zero is not None
            z = self.zero[:, col]
            v = (torch.round(y) + z).clamp(0, 15) - z
        else:
            mini = MINIFLOATS.get(fmt) or MX.get(fmt) or el.E2M1
            v = el.decode(el.encode(y, mini), mini, torch.float32)
        return torch.where(s > 0, v * s, 0.0)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,  # [out, in]
    hessian: torch.Tensor,  # [in, in], 2 X^T X / tokens
    template: QuantizedTensor,  # round-to-nearest of `weight`: its scales are kept
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> QuantizedTensor:
    """Codes for `weight` on the scales of `template`. `act_order`: columns are quantized in
    order of decreasing H_jj (the loudest inputs first, while the most columns remain to take
    their error), as AutoGPTQ's desc_act; the scales being fixed, the order changes no layout."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grid = Grid(template)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        grid.scale = grid.scale[:, perm]
        grid.zero = None if grid.zero is None else grid.zero[:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = grid.round(col, i1 + i)
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return encode_with(template, w)
