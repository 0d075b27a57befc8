"""The Llama family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

A thin composition of shared layers over a packed batch of tokens (no batch dimension: the
attention metadata says which tokens belong to which request). Parameter names follow Hugging
Face; q/k/v and gate/up are merged on load (`stacked_params`) so each is one matmul. Layers
come from a LayerFactory (quantization chosen there); the embedding and head from
layers/embedding.py. Architecture only: no quantization, packing or compile policy here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata, TorchAttention
from tokenmill.layers.embedding import EmbeddingHead
from tokenmill.layers.factory import LayerFactory
from tokenmill.layers.linear import Linear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch import ModelArch
from tokenmill.models.weights import expected_names

# checkpoint name part -> (merged module name part, shard index)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class Attention(nn.Module):
    def __init__(
        self, arch: ModelArch, rotary: RotaryEmbedding, factory: LayerFactory, prefix: str
    ) -> None:
        super().__init__()
        dtype = factory.dtype
        self.head_dim = d = arch.head_dim
        # this rank's heads (all of them on one device)
        self.num_heads, self.num_kv_heads = factory.heads(arch.num_heads, arch.num_kv_heads, d)
        sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        self.qkv_proj = factory.qkv(f"{prefix}.qkv_proj", arch.hidden_size, arch.num_heads,
                                    arch.num_kv_heads, d, arch.attention_bias)  # fmt: skip
        self.o_proj = factory.row(
            f"{prefix}.o_proj", arch.num_heads * d, arch.hidden_size, arch.o_proj_bias
        )
        self.q_norm = RMSNorm(d, arch.rms_norm_eps, dtype) if arch.qk_norm else None
        self.k_norm = RMSNorm(d, arch.rms_norm_eps, dtype) if arch.qk_norm else None
        self.rotary = rotary
        self.sizes = sizes
        self.backend: AttentionBackend = TorchAttention(scale=d**-0.5)

    def project(self, cos_sin, x):
        """x [tokens, hidden] -> rotated q [tokens, heads, dim], rotated k and v [tokens,
        kv_heads, dim]."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(-1, h + 2 * kvh, d)  # [tokens, heads + 2 kv_heads, dim]
        v = qkv[:, h + kvh :]
        if self.q_norm is not None and self.k_norm is not None:
            q = self.rotary.apply(self.q_norm(qkv[:, :h]), cos_sin)
            k = self.rotary.apply(self.k_norm(qkv[:, h : h + kvh]), cos_sin)
        else:  # q and k sit side by side: rotate them in one pass
            qk = self.rotary.apply(qkv[:, : h + kvh], cos_sin)
            q, k = qk[:, :h], qk[:, h:]
        return q, k, v


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_up_proj = factory.column(f"{prefix}.gate_up_proj", h, [i, i], arch.mlp_bias)
        self.down_proj = factory.row(f"{prefix}.down_proj", i, h, arch.mlp_bias)
        self.act: SiluAndMul = SiluAndMul()  # a rotated model's is RotatedSiluAndMul (--rotate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArch, rotary: RotaryEmbedding, factory: LayerFactory, prefix: str
    ) -> None:
        super().__init__()
        dtype = factory.dtype
        self.self_attn = Attention(arch, rotary, factory, f"{prefix}.self_attn")
        self.mlp = MLP(arch, factory, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, cos_sin, x, residual, kv_cache, meta):
        q, k, v, residual = self.attention_inputs(cos_sin, x, residual)
        o = self.self_attn.backend.forward(q, k, v, kv_cache, meta)
        return self.attention_outputs(o, residual)

    # The two halves around the paged attention: pure tensor code that the runner's compile
    # policy may hand to torch.compile (`compile_with`; the attention reads block tables and
    # writes the KV cache, so it stays eager, as vLLM's piecewise compilation splits there).
    def attention_inputs(self, cos_sin, x, residual):
        if self.fused_inputs is not None and not torch.compiler.is_compiling():
            fused = self.fused_inputs(cos_sin, x, residual)
            if fused is not None:  # decode sizes (layers/fused_decode.py)
                return fused
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.project(cos_sin, x)
        return q, k, v, residual

    def attention_outputs(self, o, residual):
        if self.fused_outputs is not None and not torch.compiler.is_compiling():
            fused = self.fused_outputs(o.reshape(o.shape[0], -1), residual)
            if fused is not None:  # decode sizes (layers/fused_decode.py)
                return fused
        x = self.self_attn.o_proj(o.reshape(o.shape[0], -1))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    fused_inputs = None  # attention_inputs as one native call at decode sizes (fuse_with)
    fused_outputs = None  # and attention_outputs

    def fuse_with(self, build_inputs, build_outputs) -> None:
        """Let `build_inputs(norm, qkv_proj, rotary, attn)` and `build_outputs(o_proj, norm,
        gate_up, down, act)` (layers/fused_decode.py, the runner's choice) take the two halves
        at decode sizes where they can."""
        attn, mlp = self.self_attn, self.mlp
        self.fused_inputs = build_inputs(self.input_layernorm, attn.qkv_proj, attn.rotary, attn)
        self.fused_outputs = build_outputs(
            self.self_attn.o_proj,
            self.post_attention_layernorm,
            mlp.gate_up_proj,
            mlp.down_proj,
            mlp.act,
        )

    def compile_with(self, compile_fn) -> None:
        """Replace the two halves by `compile_fn(half)` (the runner chooses the compiler)."""
        self.attention_inputs = compile_fn(self.attention_inputs)
        self.attention_outputs = compile_fn(self.attention_outputs)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, max_positions: int) -> None:
        super().__init__()
        dtype = factory.dtype
        self.rotary = rotary = RotaryEmbedding(
            arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling
        )
        # a pipeline stage builds its own layers (placeholders keep the others' indices), the
        # first the embedding, the last the norm (and the embedding's table for a tied head)
        stage = factory.stage
        self.own = stage.layers(arch.num_layers)
        has_table = stage.first or (stage.last and arch.tie_word_embeddings)
        self.embed_tokens = (
            factory.embedding(arch.vocab_size, arch.hidden_size) if has_table else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(arch, rotary, factory, f"model.layers.{i}") if i in self.own else nn.Identity()
            for i in range(arch.num_layers)
        )  # fmt: skip
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype) if stage.last else None


class LlamaForCausalLM(EmbeddingHead, nn.Module):
    def __init__(self, arch: ModelArch, factory: LayerFactory, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.stage = factory.stage
        self.model = LlamaModel(arch, factory, max_positions)
        # None when tied on one device: the embedding's table is the head
        self.lm_head = None  # type: ignore[assignment]
        if self.stage.last:
            self.lm_head = factory.lm_head(self.model.embed_tokens, arch.hidden_size, arch.vocab_size,
                                           arch.tie_word_embeddings)  # type: ignore[assignment]  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # per own layer [2, kv_heads, num_slots, head_dim]
        meta: AttentionMetadata,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """[num_tokens, hidden] after the final norm; a pipeline stage other than the first
        starts from `carried` (the previous stage's hidden and residual), one other than the
        last returns its (hidden, residual) for the next."""
        if carried is None:
            x, residual = self.model.embed_tokens(input_ids), None
        else:
            x, residual = carried
        cos_sin = self.model.rotary.lookup(positions, x.dtype)
        looped = None
        if self.decode_layers is not None and not torch.compiler.is_compiling():
            looped = self.decode_layers(x, cos_sin, kv_caches, meta)  # decode sizes: one call
        if looped is not None:
            x, residual = looped
        else:
            for layer, kv_cache in zip(self.own_layers(), kv_caches):
                x, residual = layer(cos_sin, x, residual, kv_cache, meta)
        if not self.stage.last:
            return x, residual
        x, _ = self.model.norm(x, residual)
        return x

    decode_layers = None  # the decoder layers as one native call at decode sizes (loop_with)

    def loop_with(self, build) -> None:
        """Let `build(layers)` (layers/decode_layers.py, the runner's choice) run the decoder
        layers of a decode step as one call where it can; it returns None where it cannot."""
        self.decode_layers = build(self.own_layers())

    def cache_layers(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of each layer's K/V cache, in layer order: the cache spec."""
        return [(lyr.self_attn.num_kv_heads, lyr.self_attn.head_dim) for lyr in self.own_layers()]

    def own_layers(self) -> list[DecoderLayer]:
        """This stage's decoder layers (all of them on one device)."""
        return [self.model.layers[i] for i in self.model.own]  # type: ignore[misc]

    def compile_units(self) -> list[DecoderLayer]:
        """The layers whose halves around attention the runner may compile."""
        return self.own_layers()

    def process_weights_after_loading(self) -> None:
        """Let each linear layer's quant method repack its weights, once, after loading; then
        the embedding and head (layers/embedding.py)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.quant_method.process_weights_after_loading(module)
        self.process_embedding_after_loading()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in; returns the parameter names that were filled.

        An unexpected tensor name is an error naming it; the loader checks for missing ones.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # tied: some checkpoints still carry a copy
            if not self.stage_holds(name):
                continue  # another pipeline stage's
            target, shard = self.resolve_name(name)
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {self.arch.architecture}"
                )
            module = self.get_submodule(target.rsplit(".", 1)[0])
            loader = getattr(module, "weight_loader", None)  # linear and sharded layers
            if loader is not None:
                loader(param, tensor, shard)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                    )
                param.data.copy_(tensor)
            loaded.add(name if shard is None else f"{target}#{shard}")
        if self.embedding_source == "head" and "model.embed_tokens.weight" in loaded:
            assert self.lm_head is not None
            self.lm_head.weight.data.copy_(self.model.embed_tokens.weight.data)
            loaded.add("lm_head.weight")
        return loaded

    def stage_holds(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to this pipeline stage's part of the model."""
        if self.stage.size == 1:
            return True
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.model.own
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        return self.stage.last  # the final norm and the head

    @staticmethod
    def resolve_name(name: str) -> tuple[str, int | None]:
        """Checkpoint name -> (parameter name, shard index in a merged layer or None)."""
        for part, (merged, index) in STACKED_PARAMS.items():
            if part in name:
                return name.replace(part, merged), index
        return name, None

    def expected_weights(self) -> set[str]:
        """Names that `load_weights` must have filled (merged shards as `name#i`)."""
        return expected_names(self)
