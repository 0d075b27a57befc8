"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the merged [..., 2 * d] output of gate_up_proj."""

    native = None  # a native_ops.RowKernels, given by the runner on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.native is not None:
            out = self.native.silu_mul(x)
            if out is not None:
                return out
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class RotatedSiluAndMul(SiluAndMul):
    """rotation(silu(gate) * up): QuaRot's online rotation of down_proj's input (the rotation
    is a quant/rotation.OnlineRotation, block Hadamard). With the native kernels one pass (the
    transform done on the row in cache; a custom op, so compiled layers call it as well)."""

    def __init__(self, rotation: nn.Module) -> None:
        super().__init__()
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.device.type == "cpu" and x.dtype in self.native.silu:
            return torch.ops.tokenmill.silu_mul_hadamard(x, self.rotation.block)
        return self.rotation(super().forward(x))
