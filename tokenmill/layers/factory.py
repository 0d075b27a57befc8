"""LayerFactory: how a model file gets its linear layers, each with the quant method chosen for
its name (`model.layers.3.mlp.down_proj`) passed at construction, so the method's
`create_weights` is the one that runs. Model files ask the factory and never see quantization;
tensor-parallel variants (Column/RowParallel) will be chosen here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.layers.linear import Linear


def _unquantized(prefix: str) -> None:
    return None


@dataclass(frozen=True)
class LayerFactory:
    dtype: torch.dtype  # parameters' dtype
    method_for: Callable[[str], object | None] = _unquantized  # name -> quant method or None

    def linear(
        self, prefix: str, in_features: int, output_sizes: Sequence[int], bias: bool = False
    ) -> Linear:
        return Linear(in_features, output_sizes, bias, self.dtype, self.method_for(prefix))
