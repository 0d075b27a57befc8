"""torch._scaled_mm with per-row and per-column scales, in whichever form the device accepts.

Which output dtype and row padding a GPU's FP8 GEMM takes differs between torch versions and
GPUs; the first call per (device, dtype) finds out, later calls reuse the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SCALED_MM_FORMS: dict[tuple, tuple[torch.dtype, int]] = {}


def scaled_mm_rowwise(
    xq: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """E4M3 xq [M, K] @ w [N, K]^T, scaled per row (sx [M, 1]) and per column (sw [N]) through
    torch._scaled_mm. Which output dtype and row padding the device's kernel accepts differs
    between torch versions and GPUs: the first call per (device, dtype) tries the exact form
    (output in `dtype`, no padding), then bf16 output, then rows padded to 16, and keeps the
    first that runs (`scaled_mm_form`)."""
    key = (xq.device, dtype)
    forms = [_SCALED_MM_FORMS[key]] if key in _SCALED_MM_FORMS else _candidate_forms(dtype)
    error: RuntimeError | None = None
    for out_dtype, pad in forms:
        m = xq.shape[0]
        rows = -(-m // pad) * pad
        a, sa = xq, sx.contiguous()
        if rows != m:
            a, sa = (
                F.pad(xq.view(torch.uint8), (0, 0, 0, rows - m)).view(xq.dtype),
                F.pad(sa, (0, 0, 0, rows - m), value=1.0),
            )
        try:
            y = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw[None, :], out_dtype=out_dtype)
        except RuntimeError as e:  # this form is not supported here: try the next
            error = e
            continue
        _SCALED_MM_FORMS[key] = (out_dtype, pad)
        return y[:m]
    raise RuntimeError(f"torch._scaled_mm accepts none of {forms} on {xq.device}") from error


def _candidate_forms(dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
    forms = [(dtype, 1), (torch.bfloat16, 1), (dtype, 16), (torch.bfloat16, 16)]
    return list(dict.fromkeys(forms))


def scaled_mm_form(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, int] | None:
    """(output dtype, row padding) that scaled_mm_rowwise settled on, None before its first call."""
    return _SCALED_MM_FORMS.get((device, dtype))
