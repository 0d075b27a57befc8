"""Linear layers whose matmul is delegated to a quant method.

A layer owns `quant_method`, which creates its parameters and applies them; the loader calls
`process_weights_after_loading` once all weights are in. Merged layers (q/k/v, gate/up) hold
several checkpoint tensors stacked along the output dimension; each parameter has a
`weight_loader(param, tensor, shard_id)` that writes one checkpoint tensor into its rows, so the
model keeps Hugging Face names and checkpoints load without conversion.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import skinny


class UnquantizedMethod:
    """Plain weights in the model dtype; matmul through torch.

    On CPU in float32 or bfloat16 the weight is repacked once, after loading, into oneDNN's
    blocked layout and applied with oneDNN's GEMM: on this machine's AMD EPYC that runs 1.2-2x
    faster than the default MKL path for every shape the model has (BENCHMARKS.md, "CPU GEMM
    backends"), and it shares torch's OpenMP threads, so nothing else competes for the cores.
    """

    compilable = True  # apply is pure tensor code
    packed: torch.Tensor | None = None  # the oneDNN layout of the weight, where it applies
    block_cols: int = 0  # skinny.linear's reading of `packed` for 1-8 rows; 0: oneDNN only
    _readable_cols: int = 0  # what skinny.match_block_cols found at load (attach_native uses it)
    invariant: object | None = None  # batch-invariant mode's kernel (layers/invariant.py)

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=layer.params_dtype),
            requires_grad=False,
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        weight = layer.weight.data
        self.packed = pack_for_cpu(weight)
        if self.packed is not None:
            # whether the skinny kernel can read the packed bytes: checked now, while the plain
            # weight to compare them with is still here (attach_native comes later)
            self._readable_cols = skinny.match_block_cols(self.packed, weight)
            del layer.weight  # the packed copy is the weight now

    def attach_native(self, layer: Linear) -> bool:
        """Decode's skinny kernel over the packed weight (layers/skinny.py), where it applies."""
        if self.packed is None or self.invariant is not None:
            return False
        self.block_cols = self._readable_cols
        return self.block_cols > 0

    def tensors(self) -> list[torch.Tensor]:
        if self.invariant is not None:
            return [self.invariant.packed]  # type: ignore[attr-defined]
        return [self.packed] if self.packed is not None else []

    def make_invariant(self, layer: Linear) -> None:
        """Batch-invariant mode: the weight repacked for layers/invariant.py's kernel."""
        from tokenmill.layers.invariant import InvariantLinear

        weight = layer.weight.data if self.packed is None else unpack_for_cpu(self.packed, layer)
        self.invariant = InvariantLinear(weight, layer.bias)
        self.packed = None
        if hasattr(layer, "weight"):
            del layer.weight

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.invariant is not None:
            return self.invariant(x)
        if self.packed is not None:
            return packed_linear(x, self.packed, layer.bias, self.block_cols)
        return F.linear(x, layer.weight, layer.bias)


@functools.cache
def _can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU: bf16 needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT, which an AVX2-only CPU lacks (the op raises there)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """[out, in] fp32/bf16 CPU weight -> oneDNN-packed weight, or None where that does not apply."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not _can_pack(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def unpack_for_cpu(packed: torch.Tensor, layer: Linear) -> torch.Tensor:
    """The [out, in] weight back from its oneDNN layout (oneDNN has no unpack op): the product
    with the identity, exact, since each output is one weight times 1 plus zeros."""
    eye = torch.eye(layer.in_features, dtype=layer.params_dtype)
    return torch.ops.mkldnn._linear_pointwise(eye, packed, None, "none", [], "").t().contiguous()


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, block_cols: int = 0
):
    """x [..., in] @ W^T (+ bias) with a weight from `pack_for_cpu`: 1-8 rows through the
    skinny kernel where `block_cols` says it reads `packed` (skinny.match_block_cols), the rest
    through oneDNN's GEMM."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():  # inductor lowers the raw op only for frozen weights
        y = _packed_linear_op(x2, packed, bias, block_cols)
    else:
        y = _packed_linear(x2, packed, bias, block_cols)
    return y.view(*x.shape[:-1], y.shape[-1])


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias, block_cols: int) -> torch.Tensor:
    y = skinny.linear(x, packed, bias, block_cols) if block_cols else None
    if y is None:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return y


@torch.library.custom_op("tokenmill::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, block_cols: int
) -> torch.Tensor:
    """The packed GEMM as an opaque op for torch.compile: a compiled region calls it as is and
    fuses what lies around it (norms, activations, residual adds)."""
    return _packed_linear(x, packed, bias, block_cols)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, block_cols: int):
    return x.new_empty(x.shape[0], packed.shape[0])


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
