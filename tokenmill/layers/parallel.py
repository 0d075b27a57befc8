"""Tensor-parallel layers: each rank holds its shard of a layer and loads it from the whole
checkpoint tensor through its weight loader, so checkpoints load unchanged on any size.

- `ColumnParallelLinear`: the output rows split; each stacked piece (q, k, v; gate, up) split on
  its own, with the K and V rows of a rank being its share of the KV heads, or the one KV head
  its query heads use when there are fewer KV heads than ranks (replicated). No communication:
  the next layer takes the sharded activations.
- `RowParallelLinear`: the input columns split; the partial products all-reduced. The bias is
  added once (rank 0 holds it; the others hold zeros: x + 0 is x exactly).
- `VocabParallelEmbedding`: the vocabulary's rows split (padded to a multiple of the size);
  ids outside a rank's range look up zeros; the rows all-reduced.
- `ParallelLMHead`: logits of a rank's vocabulary rows, all-gathered (and the padding cut).

The quant method of each layer sees only the rank's shard (its shapes): unquantized weights shard
here; quant methods whose parameters are not rows of the weight are refused with a clear error
until they shard themselves (issue #20).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.linear import Linear, UnquantizedMethod
from tokenmill.parallel.group import TPGroup, kv_split, split


def _plain(method, what: str) -> None:
    if method is not None and type(method) is not UnquantizedMethod:
        raise ValueError(
            f"{what}: quant method {type(method).__name__} does not shard for tensor "
            "parallelism yet; serve it with tensor_parallel_size 1"
        )


class ColumnParallelLinear(Linear):
    """Rank's rows of each stacked piece: `slices[i]` = (start, length) in piece i's rows."""

    def __init__(
        self,
        in_features: int,
        full_sizes: Sequence[int],
        slices: Sequence[tuple[int, int]],
        group: TPGroup,
        bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        quant_method=None,
    ) -> None:
        _plain(quant_method, "a column-parallel layer")
        self.full_sizes, self.slices, self.group = list(full_sizes), list(slices), group
        super().__init__(in_features, [n for _, n in slices], bias, params_dtype, quant_method)

    @classmethod
    def even(cls, in_features: int, full_sizes: Sequence[int], group: TPGroup, what: str,
             **kw) -> ColumnParallelLinear:  # fmt: skip
        """Every piece split evenly (an MLP's gate and up, a plain layer)."""
        slices = [split(n, group.size, group.rank, what) for n in full_sizes]
        return cls(in_features, full_sizes, slices, group, **kw)

    @classmethod
    def qkv(cls, hidden: int, heads: int, kv_heads: int, head_dim: int, group: TPGroup,
            **kw) -> ColumnParallelLinear:  # fmt: skip
        """q split by heads; k and v by KV heads, replicated when fewer than ranks."""
        q = split(heads * head_dim, group.size, group.rank, "num_attention_heads", head_dim)
        kv = kv_split(kv_heads, head_dim, group.size, group.rank)
        full = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        return cls(hidden, full, [q, kv, kv], group, **kw)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        piece = 0 if shard_id is None else shard_id
        if loaded.shape[0] != self.full_sizes[piece]:
            raise ValueError(f"shape mismatch: piece {piece} has {self.full_sizes[piece]} rows, got {tuple(loaded.shape)}")  # fmt: skip
        start, length = self.slices[piece]
        super().weight_loader(param, loaded.narrow(0, start, length), shard_id)


class RowParallelLinear(Linear):
    """Rank's share of the input columns; the outputs summed over ranks."""

    def __init__(
        self,
        in_features: int,
        output_size: int,
        group: TPGroup,
        what: str,
        bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        quant_method=None,
    ) -> None:
        _plain(quant_method, what)
        self.group = group
        self.full_in = in_features
        self.start, local = split(in_features, group.size, group.rank, what)
        super().__init__(local, [output_size], bias, params_dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        if param is self.bias:
            super().weight_loader(param, loaded if self.group.rank == 0 else torch.zeros_like(loaded), shard_id)  # fmt: skip
            return
        if loaded.dim() != 2 or loaded.shape[1] != self.full_in:
            raise ValueError(f"shape mismatch: expected [*, {self.full_in}], got {tuple(loaded.shape)}")  # fmt: skip
        super().weight_loader(param, loaded.narrow(1, self.start, self.in_features), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.quant_method.apply(self, x))


class VocabParallelEmbedding(nn.Module):
    """Rank's rows of the vocabulary, `per_rank` = ceil(vocab / size), zero rows as padding."""

    def __init__(self, vocab: int, hidden: int, group: TPGroup, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__()
        self.vocab, self.group = vocab, group
        self.per_rank = -(-vocab // group.size)
        self.start = group.rank * self.per_rank
        self.rows = max(0, min(self.per_rank, vocab - self.start))  # real rows (the rest pad)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden, dtype=dtype), requires_grad=False)  # fmt: skip

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        if loaded.shape[0] != self.vocab:
            raise ValueError(f"shape mismatch: expected {self.vocab} rows, got {tuple(loaded.shape)}")  # fmt: skip
        param.data[: self.rows].copy_(loaded.narrow(0, self.start, self.rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.per_rank)
        rows = F.embedding((ids - self.start) * mine, self.weight)
        return self.group.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))


class ParallelLMHead(nn.Module):
    """Logits over the whole vocabulary from each rank's rows (its own, or a tied embedding's)."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool = True) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: the model owns it
        self.tied = tied
        if not tied:
            self.weight = nn.Parameter(torch.zeros_like(embedding.weight), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        self.embedding.weight_loader(param, loaded, shard_id)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.tied else self.weight
        logits = self.embedding.group.all_gather(F.linear(hidden, weight), dim=-1)
        return logits[..., : self.embedding.vocab]
