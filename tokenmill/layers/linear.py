"""Linear layers whose matmul is delegated to a quant method.

A layer owns `quant_method`, which creates its parameters and applies them; the loader calls
`process_weights_after_loading` once all weights are in. Merged layers (q/k/v, gate/up) hold
several checkpoint tensors stacked along the output dimension; each parameter has a
`weight_loader(param, tensor, shard_id)` that writes one checkpoint tensor into its rows, so the
model keeps Hugging Face names and checkpoints load without conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class UnquantizedMethod:
    """Plain weights in the model dtype; matmul through torch (MKL on CPU, cuBLAS on GPU).

    After loading, the weight is stored transposed, [in, out], and applied as x @ W. On CPU in
    float32 the product goes through numpy's OpenBLAS (zero-copy views of the same memory): on
    this machine's AMD EPYC it runs 1.15-2.5x faster than torch's MKL for every shape the model
    has, from batch-1 matrix-vector to 2048-token prefill (BENCHMARKS.md, "CPU GEMM backends").
    """

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.params_dtype),
            requires_grad=False,
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.weight_t = layer.weight.data.t().contiguous()  # [in, out]
        del layer.weight

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        weight_t = getattr(layer, "weight_t", None)
        if weight_t is None:  # not processed yet (e.g. a layer built outside the loader)
            return F.linear(x, layer.weight, layer.bias)
        y = matmul(x, weight_t)
        return y if layer.bias is None else y + layer.bias


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w [in, out], through OpenBLAS for float32 on CPU (see UnquantizedMethod)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.matmul(x, w)
    a = x.reshape(-1, x.shape[-1]).contiguous().numpy()
    out = torch.from_numpy(np.matmul(a, w.numpy()))
    return out.view(*x.shape[:-1], w.shape[1])


class Linear(nn.Module):
    """y = x W^T + b over `output_sizes` stacked shards (one shard for a plain layer)."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        quant_method: UnquantizedMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.params_dtype = params_dtype
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, dtype=params_dtype), requires_grad=False)
            if bias
            else None
        )

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None
    ) -> None:
        """Copy one checkpoint tensor into `param` (into shard `shard_id`'s rows if merged)."""
        target = param.data
        if shard_id is not None:
            start = sum(self.output_sizes[:shard_id])
            target = target.narrow(0, start, self.output_sizes[shard_id])
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shape mismatch: expected {tuple(target.shape)}, got {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"
