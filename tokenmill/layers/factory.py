"""LayerFactory: how a model file gets its linear layers, each with the quant method chosen for
its name (`model.layers.3.mlp.down_proj`) passed at construction, so the method's
`create_weights` is the one that runs. Model files ask the factory by role (q/k/v, a layer whose
output is split, one whose input is, the embedding and head) and never see quantization or
tensor parallelism: with a group of more than one rank (parallel/group.current()) the factory
builds the sharded layers of layers/parallel.py, and `heads` gives a rank's head counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.layers.linear import Linear
from tokenmill.parallel.group import Stage, TPGroup, current, current_stage, kv_split, split


def _unquantized(prefix: str) -> None:
    return None


@dataclass(frozen=True)
class LayerFactory:
    dtype: torch.dtype  # parameters' dtype
    method_for: Callable[[str], object | None] = _unquantized  # name -> quant method or None
    group: TPGroup = field(default_factory=current)  # the tensor-parallel group it shards for
    stage: Stage = field(default_factory=current_stage)  # the pipeline stage it builds

    def linear(
        self, prefix: str, in_features: int, output_sizes: Sequence[int], bias: bool = False
    ) -> Linear:
        """A layer every rank holds whole."""
        return Linear(in_features, output_sizes, bias, self.dtype, self.method_for(prefix))

    def heads(self, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
        """(query heads, KV heads) a rank computes (all of them at size 1)."""
        g = self.group
        if g.size == 1:
            return heads, kv_heads
        _, q = split(heads * head_dim, g.size, g.rank, "num_attention_heads", head_dim)
        _, kv = kv_split(kv_heads, head_dim, g.size, g.rank)
        return q // head_dim, kv // head_dim

    def qkv(self, prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int,
            bias: bool = False) -> Linear:  # fmt: skip
        """q, k and v stacked; split by heads over the ranks."""
        if self.group.size == 1:
            d = head_dim
            return self.linear(prefix, hidden, [heads * d, kv_heads * d, kv_heads * d], bias)
        from tokenmill.layers.parallel import ColumnParallelLinear

        return ColumnParallelLinear.qkv(hidden, heads, kv_heads, head_dim, self.group, bias=bias,
                                        params_dtype=self.dtype, quant_method=self.method_for(prefix))  # fmt: skip

    def column(self, prefix: str, in_features: int, output_sizes: Sequence[int],
               bias: bool = False) -> Linear:  # fmt: skip
        """A layer whose outputs split over the ranks (gate and up): no communication."""
        if self.group.size == 1:
            return self.linear(prefix, in_features, output_sizes, bias)
        from tokenmill.layers.parallel import ColumnParallelLinear

        return ColumnParallelLinear.even(in_features, output_sizes, self.group, prefix, bias=bias,
                                         params_dtype=self.dtype, quant_method=self.method_for(prefix))  # fmt: skip

    def row(self, prefix: str, in_features: int, output_size: int, bias: bool = False) -> Linear:
        """A layer whose inputs split over the ranks (o_proj, down): its outputs all-reduced."""
        if self.group.size == 1:
            return self.linear(prefix, in_features, [output_size], bias)
        from tokenmill.layers.parallel import RowParallelLinear

        return RowParallelLinear(in_features, output_size, self.group, prefix, bias=bias,
                                 params_dtype=self.dtype, quant_method=self.method_for(prefix))  # fmt: skip

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        if self.group.size == 1:
            return nn.Embedding(vocab, hidden, dtype=self.dtype)
        from tokenmill.layers.parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(vocab, hidden, self.group, self.dtype)

    def lm_head(self, embedding: nn.Module, hidden: int, vocab: int, tied: bool) -> nn.Module | None:  # fmt: skip
        """None for a tied head at size 1 (the embedding's table is the head: layers/
        embedding.py packs it); else the head's layer."""
        if self.group.size == 1:
            return None if tied else self.linear("lm_head", hidden, [vocab])
        from tokenmill.layers.parallel import ParallelLMHead

        if self.method_for("lm_head") is not None:
            raise ValueError("a quantized LM head does not shard for tensor parallelism yet")
        return ParallelLMHead(vocab, hidden, self.group, self.dtype, embedding if tied else None)  # type: ignore[arg-type]
