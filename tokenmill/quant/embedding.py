"""The token embedding stored quantized (`--quantize-embedding`).

The [vocab, hidden] table is a QuantizedTensor; a lookup gathers the codes and scales of the rows
it reads (formats.take_rows) and dequantizes only those. In a model with tied embeddings the
table *is* the LM head's quantized weight, one copy serving both, so the head's calibration
(GPTQ, scale search on the final hidden states) chooses the codes; where AWQ scaled the head's
input channels by s, the looked-up rows are divided by s again.

On the bundled model, round-to-nearest nvfp4 costs the lookup almost nothing (+0.07% perplexity,
not significant) and the head a lot (+8.6%); GPTQ on the head brings that to +0.9%
(BENCHMARKS.md), which is why the head goes through the layers' calibration.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.quant.formats import QuantizedTensor, take_rows
from tokenmill.quant.methods.weight_only import dequantize_fast


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
