"""Activation-aware weight scaling (AWQ, Lin et al., 2024) for weight-only formats.

A few input channels carry most of the activation energy, so their weights matter most to the
layer's output. Scaling input channel j of the weight by s_j and the input by 1 / s_j leaves the
product unchanged, but the scaled weights of the loud channels land on a finer grid relative to
their block's scale, and the quiet channels' coarser error is multiplied by small inputs. With
s_j = E[x_j^2]^(alpha / 2) (normalised so that max * min = 1), alpha is chosen per layer from a
grid for the least output error on the calibration text,

    sum_ij (Q(W s)_ij / s_j - W_ij)^2 E[x_j^2],

the diagonal part of the layer's output error (with the Hessian X^T X of the calibration inputs,
the whole of it: tr(dW H dW^T)). alpha = 0 (s = 1) is round-to-nearest and is
always a candidate, so the search never does worse than it by this measure. The division of the
input happens at run time (one elementwise multiply, fused into the layer's graph under
`compile`), which also covers the layers whose input no norm precedes (o_proj, down_proj).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokenmill.quant.formats import QuantizedTensor

ALPHAS = tuple(i / 10 for i in range(11))
SAMPLE_ROWS = 128  # rows of each shard on which the error is measured


def awq_scale(
    weight: torch.Tensor,  # [out, in]
    output_sizes: Sequence[int],
    mean_square: torch.Tensor,  # [in] E[x^2] per input channel, from calibration
    quantize_weight: Callable[[torch.Tensor], QuantizedTensor],
    hessian: torch.Tensor | None = None,  # [in, in] X^T X / tokens (up to a factor), if recorded
) -> torch.Tensor | None:
    """The input-channel scales s [in] (fp32) with the least output error, or None where no
    alpha beats round-to-nearest. Merged layers (q/k/v, gate/up) share one s: they share
    their input."""
    # alpha is a statistic of the whole layer: measured on evenly spaced rows of each shard
    # (rows quantize independently, up to nvfp4's per-tensor scale), 10-20x faster to search
    shards = [_rows_sample(p) for p in weight.detach().float().split(list(output_sizes))]
    w = torch.cat(shards)
    importance = mean_square.float().clamp(min=1e-12)
    best_s, best_err = None, None
    for alpha in ALPHAS:
        s = importance.pow(alpha / 2)
        s = s / (s.max() * s.min()).sqrt()
        parts = [quantize_weight(p * s) for p in shards]
        deq = torch.cat([p.dequantize(torch.float32) for p in parts])
        diff = torch.nan_to_num(deq / s - w, nan=0.0)
        if hessian is None:
            err = (diff.pow(2) * importance).sum().item()
        else:  # the whole output error, cross-channel terms included: tr(dW H dW^T)
            err = ((diff @ hessian.float()) * diff).sum().item()
        if best_err is None or err < best_err:
            best_s, best_err = (None if alpha == 0 else s), err
    return best_s


def _rows_sample(w: torch.Tensor) -> torch.Tensor:
    if w.shape[0] <= SAMPLE_ROWS:
        return w
    return w[torch.linspace(0, w.shape[0] - 1, SAMPLE_ROWS).long()]
