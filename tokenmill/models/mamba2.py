"""Mamba-2 (Hugging Face `Mamba2ForCausalLM`): an embedding, N blocks of RMSNorm + Mamba-2
mixer with a residual, a final norm and the head. No attention and no positions: each layer's
memory of the sequence is its state (conv + SSM) in the request's state slot, which the runner
allocates from `state_layers()` and passes as the layer's cache.

Checkpoint names are Hugging Face's (`backbone.embeddings`, `backbone.layers.N.norm`,
`backbone.layers.N.mixer.*`, `backbone.norm_f`, `lm_head`), mapped onto this module tree
(`model.embed_tokens`, `model.layers.N.*`, `model.norm`) so the shared embedding and head
code (layers/embedding.py) applies. No pipeline or tensor parallelism for SSM layers yet.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.embedding import EmbeddingHead
from tokenmill.layers.factory import LayerFactory
from tokenmill.layers.mamba import Mamba2Mixer
from tokenmill.layers.norm import RMSNorm
from tokenmill.models.arch import ModelArch
from tokenmill.models.weights import SingleStageModel, load_named

NAMES = (("backbone.embeddings.", "model.embed_tokens."), ("backbone.layers.", "model.layers."),
         ("backbone.norm_f.", "model.norm."))  # fmt: skip


class MambaBlock(nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        s = arch.ssm
        assert s is not None
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, factory.dtype)
        self.mixer = Mamba2Mixer(
            factory, f"{prefix}.mixer", arch.hidden_size, s.num_heads, s.head_dim, s.state_size,
            s.num_groups, s.conv_kernel, s.chunk_size, arch.rms_norm_eps, s.use_bias,
            s.use_conv_bias, s.time_step_limit,
        )  # fmt: skip
        self.residual_in_fp32 = s.residual_in_fp32

    def forward(self, x, state, seqs):
        residual = x.float() if self.residual_in_fp32 else x
        h = self.mixer(self.norm(x), seqs, *state)
        return (residual + h).to(x.dtype)


class MambaModel(nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory) -> None:
        super().__init__()
        self.embed_tokens = factory.embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            MambaBlock(arch, factory, f"model.layers.{i}") for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, factory.dtype)


class Mamba2ForCausalLM(SingleStageModel, EmbeddingHead, nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, max_positions: int) -> None:
        super().__init__()
        if factory.group.size > 1 or factory.stage.size > 1:
            raise ValueError("Mamba-2 under tensor or pipeline parallelism is not built yet")
        self.arch = arch
        self.stage = factory.stage
        self.model = MambaModel(arch, factory)
        self.lm_head = factory.lm_head(self.model.embed_tokens, arch.hidden_size, arch.vocab_size,
                                       arch.tie_word_embeddings)  # type: ignore[assignment]  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # unused: the state carries the order
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (conv, ssm) states
        meta: AttentionMetadata,
        carried=None,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer, state in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, state, meta.ssm)
        return self.model.norm(x)

    def cache_layers(self) -> list[tuple[int, int]]:
        return []  # no attention layer: no K/V blocks

    def state_layers(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each layer's per-sequence (conv state, SSM state) shapes: its cache spec."""
        return [layer.mixer.state_shapes() for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in (Hugging Face names); returns the names filled."""
        tied = self.arch.tie_word_embeddings
        return load_named(self, weights, _ours, skip=lambda n: tied and n == "lm_head.weight")


def _ours(name: str) -> tuple[str, None]:
    """A Hugging Face Mamba-2 name -> this module tree's."""
    for theirs, ours in NAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :], None
    return name, None
