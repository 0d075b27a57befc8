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

Plain weights are cut as they load. A layer with a quant method that quantizes on load (int8,
int4, fp8, w8a8, nvfp4, mxfp4, ...) is loaded and quantized whole on every rank, exactly as on
one device, and then keeps its rank's share of the codes and scales (rows for a column layer;
whole scale groups of columns for a row layer: a shard that would cut a group is an error
naming the group size), so the weights equal one device's bit for bit. Calibrated methods
(SmoothQuant, GPTQ, AWQ, scale search) measure the whole layer's input on every rank
(quant/calibrate.py) and quantize it whole alike; a row layer then keeps its columns of the
smoothing too. A quantized safetensors checkpoint's whole codes, and a GGUF file's blocks
(quantization='gguf'), are cut the same way as they install: rows, or whole blocks of columns
(a shard that would cut a block is an error naming its size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.linear import Linear, UnquantizedMethod
from tokenmill.parallel.group import TPGroup, kv_split, split


def _quantized(method, what: str) -> bool:
    """True for a quantize-on-load method, calibrated or not (quantized whole, then sharded);
    False for plain weights; a ValueError for what does not shard yet."""
    if method is None or type(method) is UnquantizedMethod:
        return False
    from tokenmill.quant.methods.base import QuantMethod

    if not isinstance(method, QuantMethod):
        raise ValueError(
            f"{what}: quant method {type(method).__name__} does not shard for tensor "
            "parallelism; serve it with tensor_parallel_size 1"
        )
    return True


class _Sharded:
    """A quant method seen through a parallel layer: after the layer loaded whole, it is
    quantized whole (one device's codes), `cut(layer, q)` keeps the rank's share, and that is
    installed. Every other attribute is the method's own."""

    def __init__(self, inner, cut) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "cut", cut)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)

    def install(self, layer, qweight) -> None:
        """A checkpoint's whole weight (quant/checkpoint.py's codes, a GGUF file's): the rank's
        share."""
        self.inner.install(layer, self.cut(layer, qweight))

    def process_weights_after_loading(self, layer) -> None:
        from tokenmill.quant.formats import cat_rows

        inner = self.inner
        if inner.qweight is not None or getattr(inner, "weight", None) is not None:
            return  # installed from a checkpoint's codes
        parts = inner.quantize_shards(layer)
        q = cat_rows(parts) if len(parts) > 1 else parts[0]
        del layer.weight
        inner.install(layer, self.cut(layer, q))
        inner.calibration = None


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
        self.full_sizes, self.slices, self.group = list(full_sizes), list(slices), group
        self.whole = _quantized(quant_method, "a column-parallel layer")
        sizes = self.full_sizes if self.whole else [n for _, n in slices]
        super().__init__(in_features, sizes, bias, params_dtype, quant_method)
        if self.whole:
            self.quant_method = _Sharded(self.quant_method, ColumnParallelLinear._cut)  # type: ignore[assignment]

    def rank_rows(self) -> torch.Tensor:
        """Indices of the rank's rows in the whole (stacked) weight."""
        index, offset = [], 0
        for (start, length), full in zip(self.slices, self.full_sizes):
            index.append(torch.arange(offset + start, offset + start + length))
            offset += full
        return torch.cat(index)

    def _cut(self, q):
        """The rank's rows of each piece (codes, scales; the bias too)."""
        from tokenmill.quant.formats import take_rows

        rows = self.rank_rows()
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.data.index_select(0, rows.to(self.bias.device)), requires_grad=False)  # fmt: skip
        self.output_sizes = [n for _, n in self.slices]
        self.out_features = sum(self.output_sizes)
        if hasattr(q, "take_rows"):  # a GGUF file's codes (quant/methods/gguf.GGUFWeight)
            return q.take_rows(rows)
        return take_rows(q, rows.to(q.data.device))

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
        if self.whole:  # quantized whole after loading, then cut (_cut)
            super().weight_loader(param, loaded, shard_id)
            return
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
        self.group = group
        self.full_in = in_features
        self.start, self.local = split(in_features, group.size, group.rank, what)
        self.whole = _quantized(quant_method, what)
        width = in_features if self.whole else self.local
        super().__init__(width, [output_size], bias, params_dtype, quant_method)
        if self.whole:
            self.quant_method = _Sharded(self.quant_method, RowParallelLinear._cut)  # type: ignore[assignment]

    def _cut(self, q):
        """The rank's columns: whole scale groups (a cut inside one is an error), and its
        share of the input smoothing (SmoothQuant, AWQ) when there is one."""
        from tokenmill.quant.formats import take_cols

        self.in_features = self.local
        method = self.quant_method
        if getattr(method, "input_smooth", None) is not None:
            method.input_smooth = method.input_smooth.narrow(0, self.start, self.local).contiguous()
        if hasattr(q, "take_cols"):  # a GGUF file's codes
            return q.take_cols(self.start, self.local)
        return take_cols(q, self.start, self.local)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        if param is self.bias:
            super().weight_loader(param, loaded if self.group.rank == 0 else torch.zeros_like(loaded), shard_id)  # fmt: skip
            return
        if loaded.dim() != 2 or loaded.shape[1] != self.full_in:
            raise ValueError(f"shape mismatch: expected [*, {self.full_in}], got {tuple(loaded.shape)}")  # fmt: skip
        if self.whole:  # quantized whole after loading, then cut (_cut)
            super().weight_loader(param, loaded, shard_id)
            return
        super().weight_loader(param, loaded.narrow(1, self.start, self.in_features), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.quant_method.apply(self, x))


class _VocabRows(nn.Module):
    """A rank's rows of a vocabulary table: `per_rank` = ceil(vocab / size) from `start`, the
    ones past the vocabulary zero padding; loaded from the whole checkpoint table."""

    def __init__(self, vocab: int, hidden: int, group: TPGroup, dtype: torch.dtype, own: bool) -> None:  # fmt: skip
        super().__init__()
        self.vocab, self.group = vocab, group
        self.per_rank = -(-vocab // group.size)
        self.start = group.rank * self.per_rank
        self.rows = max(0, min(self.per_rank, vocab - self.start))  # real rows (the rest pad)
        if own:
            self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden, dtype=dtype), requires_grad=False)  # fmt: skip

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:  # fmt: skip
        if loaded.shape[0] != self.vocab:
            raise ValueError(f"shape mismatch: expected {self.vocab} rows, got {tuple(loaded.shape)}")  # fmt: skip
        param.data[: self.rows].copy_(loaded.narrow(0, self.start, self.rows))


class VocabParallelEmbedding(_VocabRows):
    """Rank's rows of the vocabulary; ids outside them look up zeros; rows all-reduced."""

    def __init__(self, vocab: int, hidden: int, group: TPGroup, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__(vocab, hidden, group, dtype, own=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.per_rank)
        rows = F.embedding((ids - self.start) * mine, self.weight)
        return self.group.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))


class ParallelLMHead(_VocabRows):
    """Logits over the whole vocabulary from each rank's rows: a tied embedding's, or its own
    (laid out as the embedding's), all-gathered."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        group: TPGroup,
        dtype: torch.dtype = torch.float32,
        embedding: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__(vocab, hidden, group, dtype, own=embedding is None)
        self.tied = embedding is not None
        if embedding is not None:
            object.__setattr__(self, "embedding", embedding)  # not a submodule: the model owns it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.tied else self.weight
        logits = self.group.all_gather(F.linear(hidden, weight), dim=-1)
        return logits[..., : self.vocab]
