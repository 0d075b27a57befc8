"""The token embedding and the LM head, tied or not, plain or quantized (`--quantize-embedding`).

`EmbeddingHead` is what a causal LM inherits for its two ends: it expects `self.model.embed_tokens`
(the [vocab, hidden] table, Hugging Face's name) and `self.lm_head` (a Linear, or None when tied).
- Plain and tied: logits use a oneDNN-packed copy of the table on CPU (the lookup keeps the rows).
- Quantized (a weight-only method): the head is a quantized Linear that takes the layers'
  calibration (GPTQ, scale search on the final hidden states; the head needs it: +8.6% perplexity
  round to nearest vs +0.9% calibrated, BENCHMARKS.md). A tied table *is* the head's quantized
  weight, one copy serving both: `QuantizedEmbedding` gathers the codes and scales of the rows it
  reads and dequantizes only those; where AWQ scaled the head's inputs by s, looked-up rows are
  divided by s again. An untied model quantizes its embedding on its own, round to nearest (the
  lookup is robust to it: +0.07%, not significant).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.linear import Linear, pack_for_cpu, packed_linear
from tokenmill.layers.skinny import match_block_cols
from tokenmill.quant.formats import QuantizedTensor, dequantize_fast, take_rows


class QuantizedEmbedding(nn.Module):
    def __init__(
        self,
        qweight: QuantizedTensor,
        dtype: torch.dtype,
        column_scale: torch.Tensor | None = None,  # [hidden] multiplies each looked-up row
    ) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"an embedding table is 2-D, got shape {qweight.shape}")
        self.qweight = qweight
        self.dtype = dtype
        self.column_scale = column_scale
        self.num_embeddings, self.embedding_dim = qweight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        x = dequantize_fast(take_rows(self.qweight, ids.reshape(-1)), torch.float32)
        if self.column_scale is not None:
            x = x * self.column_scale
        return x.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.qweight.format}"


class EmbeddingHead:
    """Mixin of a causal LM: its logits, and where its embedding and head are stored."""

    model: nn.Module  # has .embed_tokens
    lm_head: Linear | None
    arch: object  # ModelArch: hidden_size, vocab_size
    # --quantize-embedding: None (embedding and head in the model dtype), "head" (the embedding
    # is the quantized head's table: tied) or "own" (quantized on its own)
    embedding_source: str | None = None
    tied_head_packed: torch.Tensor | None = None  # oneDNN copy of a plain tied table
    tied_head_readable_cols: int = 0  # skinny.match_block_cols of that copy, at load
    tied_head_block_cols: int = 0  # the skinny kernel's reading of it; 0: oneDNN only

    invariant_head: object | None = None  # batch-invariant mode: a tied head's kernel

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab]
        if self.invariant_head is not None:
            return self.invariant_head(hidden)  # type: ignore[operator]
        if self.lm_head is None:
            if self.tied_head_packed is not None:
                return packed_linear(hidden, self.tied_head_packed, None, self.tied_head_block_cols)
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def quantize_embedding(self, method) -> None:
        """Store the LM head with `method` (a weight-only quant method) and, after loading, the
        embedding in its format. A tied model gets a head Linear built with the method and
        filled from the embedding on load, whose quantized table the embedding then reads; an
        untied model's head must have been built with a method already (the layer factory)."""
        if self.lm_head is None:
            weight = self.model.embed_tokens.weight
            hidden, vocab = weight.shape[1], weight.shape[0]
            method.keep_row_table = True  # its install keeps the whole table for the lookup
            with torch.device(weight.device):
                self.lm_head = Linear(hidden, [vocab], False, weight.dtype, method)
            self.lm_head.requires_grad_(False)
            self.embedding_source = "head"
        else:
            self.embedding_source = "own"

    def make_head_invariant(self) -> None:
        """Batch-invariant mode, a tied plain head: the embedding table packed for the
        invariant kernel (an untied head is a Linear and made invariant as one)."""
        from tokenmill.layers.invariant import InvariantLinear

        if self.lm_head is None:
            embed = self.model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):
                raise ValueError("batch_invariant does not take a quantized tied embedding")
            self.invariant_head = InvariantLinear(embed.weight.data)
            self.tied_head_packed, self.tied_head_block_cols = None, 0

    def untie_embedding(self) -> None:
        """The head and the embedding no longer hold the same matrix (rotation.py)."""
        if self.embedding_source == "head":
            assert self.lm_head is not None
            self.embedding_source = "own"
            self.lm_head.quant_method.keep_row_table = False

    def process_embedding_after_loading(self) -> None:
        """After the head's method quantized it: the embedding in its format, or the packed
        copy of a plain tied table."""
        embed = self.model.embed_tokens
        if embed is None or not getattr(getattr(self, "stage", None), "last", True):
            return  # a pipeline stage without the table, or one that computes no logits
        if self.embedding_source is not None and isinstance(embed, nn.Embedding):
            assert self.lm_head is not None
            method = self.lm_head.quant_method
            if self.embedding_source == "head":
                table, scale = method.row_table, method.smooth_inv  # AWQ: W * s was quantized
            else:  # its own table, round to nearest: the lookup is robust to it
                table, scale = method.quantize_weight(embed.weight.data.float()), None
            self.model.embed_tokens = QuantizedEmbedding(table, embed.weight.dtype, scale)
        elif self.lm_head is None:
            table = self.model.embed_tokens.weight.data
            self.tied_head_packed = pack_for_cpu(table)
            if self.tied_head_packed is not None:
                self.tied_head_readable_cols = match_block_cols(self.tied_head_packed, table)

    def attach_native_head(self) -> None:
        """Decode's skinny kernel over the packed tied head (layers/skinny.py), where it applies."""
        if self.tied_head_packed is not None:
            self.tied_head_block_cols = self.tied_head_readable_cols
