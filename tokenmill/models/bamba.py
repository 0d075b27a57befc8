"""Bamba (Hugging Face `BambaForCausalLM`): an attention/Mamba-2 hybrid. Each layer is an
RMSNorm, then either attention (the Llama family's, RoPE on half of each head) or a Mamba-2
mixer, a residual, then an RMSNorm + MLP and a residual.

The attention layers keep K/V in paged blocks and the mixers a state per request slot: the
runner passes the attention layers' caches first, then the mixers' (conv, ssm) states, each in
layer order, and the model takes them in turn by layer type. Names are Hugging Face's (q/k/v and
gate/up merged on load as in the Llama family). No tensor or pipeline parallelism yet.
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
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch import ModelArch
from tokenmill.models.llama import MLP, Attention, LlamaForCausalLM
from tokenmill.models.weights import SingleStageModel, load_named


class HybridLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary, factory: LayerFactory, prefix: str, kind: str):
        super().__init__()
        s, dtype = arch.ssm, factory.dtype
        assert s is not None
        self.kind = kind
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.pre_ff_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        if kind == "attention":
            self.self_attn = Attention(arch, rotary, factory, f"{prefix}.self_attn")
        else:
            self.mamba = Mamba2Mixer(
                factory, f"{prefix}.mamba", arch.hidden_size, s.num_heads, s.head_dim,
                s.state_size, s.num_groups, s.conv_kernel, s.chunk_size, arch.rms_norm_eps,
                s.use_bias, s.use_conv_bias, s.time_step_limit,
            )  # fmt: skip
        self.feed_forward = MLP(arch, factory, f"{prefix}.feed_forward")

    def forward(self, cos_sin, x, cache, meta: AttentionMetadata):
        h = self.input_layernorm(x)
        if self.kind == "attention":
            attn = self.self_attn
            q, k, v = attn.project(cos_sin, h)
            o = attn.backend.forward(q, k, v, cache, meta)
            h = attn.o_proj(o.reshape(o.shape[0], -1))
        else:
            h = self.mamba(h, meta.ssm, *cache)
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class BambaModel(nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, max_positions: int) -> None:
        super().__init__()
        rotary_dim = int(arch.head_dim * arch.partial_rotary_factor)
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, rotary_dim)  # fmt: skip
        self.embed_tokens = factory.embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            HybridLayer(arch, self.rotary, factory, f"model.layers.{i}", kind)
            for i, kind in enumerate(arch.layer_types)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, factory.dtype)


class BambaForCausalLM(SingleStageModel, EmbeddingHead, nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, max_positions: int) -> None:
        super().__init__()
        if factory.group.size > 1 or factory.stage.size > 1:
            raise ValueError("Bamba under tensor or pipeline parallelism is not built yet")
        self.arch = arch
        self.stage = factory.stage
        self.model = BambaModel(arch, factory, max_positions)
        self.lm_head = factory.lm_head(self.model.embed_tokens, arch.hidden_size, arch.vocab_size,
                                       arch.tie_word_embeddings)  # type: ignore[assignment]  # fmt: skip

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, carried=None):
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.model.rotary.lookup(positions, x.dtype)
        num_attention = sum(1 for k in self.arch.layer_types if k == "attention")
        attn, states = iter(kv_caches[:num_attention]), iter(kv_caches[num_attention:])
        for layer in self.model.layers:
            x = layer(cos_sin, x, next(attn if layer.kind == "attention" else states), meta)
        return self.model.norm(x)

    def cache_layers(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of each attention layer's K/V cache, in layer order."""
        return [(lyr.self_attn.num_kv_heads, lyr.self_attn.head_dim) for lyr in self.model.layers if lyr.kind == "attention"]  # fmt: skip

    def state_layers(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(conv, SSM) state shapes of each Mamba-2 layer, in layer order."""
        return [lyr.mamba.state_shapes() for lyr in self.model.layers if lyr.kind == "mamba"]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hugging Face names; q/k/v and gate/up merged as in the Llama family."""
        tied = self.arch.tie_word_embeddings

        def resolve(name: str) -> tuple[str, int | None]:
            return LlamaForCausalLM.resolve_name(name.replace("model.final_layernorm.", "model.norm."))  # fmt: skip

        return load_named(self, weights, resolve, skip=lambda n: tied and n == "lm_head.weight")
