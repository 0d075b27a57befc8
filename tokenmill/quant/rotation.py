"""Rotations that make activations easy to quantize (QuaRot, Ashkboos et al., 2024).

Per-token int8 activations lose most where one channel is much louder than the rest: the
token's scale follows its loudest channel and the quiet ones round to a few codes. An orthogonal
change of basis spreads every channel over all of them. The model computes the same function,
only in other coordinates, and the quantized layers see flat rows:

- the residual stream, in the weights: x -> x Q. Every layer that writes the residual (the
  embedding, o_proj, down_proj) gets Q on its output side, every layer that reads it (q/k/v,
  gate/up, the head) Q on its input side; the RMSNorm weights are first folded into the layers
  after them, since only a norm with unit weights commutes with Q. The head then differs from
  the embedding: a tied model gets its own head.
- each attention head's values, in the weights: v -> v R per head (v_proj's rows, o_proj's
  columns), which flattens o_proj's input.
- down_proj's input, SiLU(gate) * up, at run time (a non-linearity sits before it): random
  signs, folded into up_proj's rows, then a block-diagonal Hadamard K applied to each token
  (`OnlineRotation`, about 1/10 of down_proj's FLOPs), with K^T folded into down_proj's weight.

Q is D (O_m x H_p): random signs D, a random orthogonal O_m for the odd part m of the size and a
Sylvester Hadamard H_p for its power of two. Everything random is drawn from `seed`; a rotated
checkpoint stores its weights rotated, and loading it makes only K again.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from tokenmill.layers.activation import RotatedSiluAndMul
from tokenmill.layers.linear import Linear


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), scaled to be orthogonal, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal n x n (QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def odd_part(n: int) -> tuple[int, int]:
    """n = m * p with m odd and p the largest power of two dividing n."""
    p = n & -n
    return n // p, p


def residual_rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    """Q = D (O_m x H_p), dense float64 [n, n], n = m * p (odd_part): applied once, in the
    weights, so its cost does not matter; every channel is spread over all n."""
    m, p = odd_part(n)
    odd = random_orthogonal(m, gen) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return random_signs(n, gen)[:, None] * torch.kron(odd, hadamard(p))


ONLINE_BLOCK = 64  # down_proj's input is rotated in blocks of 64 channels: one small GEMM


class OnlineRotation(nn.Module):
    """x [tokens, n] -> x K with K block-diagonal, Hadamard blocks of `block` channels (at most
    ONLINE_BLOCK, a power of two dividing n). One [tokens * n / block, block] x [block, block]
    GEMM: 33 us for 32 x 1536 bf16 on this CPU (a full-width structured rotation, three GEMMs
    with batched small factors, took 140 us, 20% of a w8a8 decode step over 30 layers), for
    almost the same flattening (BENCHMARKS.md). The Hadamard is kept in the model's dtype, so
    that a compiled layer sees a plain tensor."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, block: int = ONLINE_BLOCK):
        super().__init__()
        self.n, self.block = n, min(block, odd_part(n)[1])
        self.scale = self.block**-0.5
        # +-1 entries, exact in every dtype; the scale after the product (exact for 64)
        signs = hadamard(self.block) * math.sqrt(self.block)
        self.register_buffer("h", signs.round().to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h if self.h.dtype == x.dtype else self.h.to(x.dtype)
        return (x.reshape(-1, self.block) @ h).mul_(self.scale).view(x.shape)

    def dense(self) -> torch.Tensor:
        """The same map as an n x n float64 matrix: x @ dense() == forward(x)."""
        return torch.block_diag(*[hadamard(self.block)] * (self.n // self.block))


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def rotate_model(model, seed: int = 0) -> None:
    """Rotate a loaded Llama-family model in place (float weights, before quantization): the same
    function, in the coordinates described above. Each decoder layer's MLP gets the online
    rotation (its activation becomes `RotatedSiluAndMul`); a tied head is untied."""
    gen = torch.Generator().manual_seed(seed)
    arch = model.arch
    inner = model.model
    q = residual_rotation(arch.hidden_size, gen)
    r = hadamard(arch.head_dim) * random_signs(arch.head_dim, gen)  # [d, d], columns signed
    embed = inner.embed_tokens.weight
    online = OnlineRotation(arch.intermediate_size, embed.dtype).to(embed.device)
    signs = random_signs(arch.intermediate_size, gen)
    q, r, signs = q.to(embed.device), r.to(embed.device), signs.to(embed.device)

    head = embed if model.lm_head is None else model.lm_head.weight
    head64 = head.double() * inner.norm.weight.double()  # fold the final norm
    if model.lm_head is None:
        model.lm_head = Linear(arch.hidden_size, [arch.vocab_size], False, embed.dtype)
        model.lm_head.to(q.device).requires_grad_(False)
    if arch.tie_word_embeddings:
        model.arch = arch = dataclasses.replace(arch, tie_word_embeddings=False)
        model.untie_embedding()  # a quantized embedding gets its own table
    _set(model.lm_head.weight, head64 @ q)
    _set(embed, embed.double() @ q)
    inner.norm.weight.data.fill_(1.0)

    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = (
            (linear.weight.double() * norm.weight.double()) @ q
            for norm, linear in (
                (layer.input_layernorm, attn.qkv_proj),
                (layer.post_attention_layernorm, mlp.gate_up_proj),
            )
        )
        layer.input_layernorm.weight.data.fill_(1.0)
        layer.post_attention_layernorm.weight.data.fill_(1.0)
        # values per head: v -> v R, so o_proj reads o R and takes R^T on its input side
        h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        v = qkv[(h + kvh) * d :].view(kvh, d, -1)
        qkv[(h + kvh) * d :] = torch.einsum("ji,kjc->kic", r, v).reshape(kvh * d, -1)
        _set(attn.qkv_proj.weight, qkv)  # one rounding to the model dtype per weight
        if attn.qkv_proj.bias is not None:
            bias = attn.qkv_proj.bias.double()
            bias[(h + kvh) * d :] = (bias[(h + kvh) * d :].view(kvh, d) @ r).reshape(-1)
            _set(attn.qkv_proj.bias, bias)
        o = attn.o_proj.weight.double().view(-1, h, d)
        _set(attn.o_proj.weight, q.T @ (o @ r).reshape(o.shape[0], h * d))
        # down_proj: its input is multiplied by the signs (in up_proj's rows) and then by the
        # online rotation; its output is the residual
        i = arch.intermediate_size
        gate_up[i:] *= signs[:, None]
        _set(mlp.gate_up_proj.weight, gate_up)
        if mlp.gate_up_proj.bias is not None:
            bias = mlp.gate_up_proj.bias.double()
            bias[i:] *= signs
            _set(mlp.gate_up_proj.bias, bias)
        down = q.T @ (mlp.down_proj.weight.double() * signs)  # [hidden, i]
        _set(mlp.down_proj.weight, online(down))  # x K row by row, block by block
        for linear in (attn.o_proj, mlp.down_proj):
            if linear.bias is not None:
                _set(linear.bias, linear.bias.double() @ q)
        mlp.act = RotatedSiluAndMul(online)


def install_online_rotation(model) -> None:
    """For a checkpoint written rotated: its weights already are; only the run-time rotation of
    down_proj's input (which draws nothing at random) is made again."""
    embed = model.model.embed_tokens.weight
    online = OnlineRotation(model.arch.intermediate_size, embed.dtype).to(embed.device)
    for layer in model.model.layers:
        layer.mlp.act = RotatedSiluAndMul(online)
