"""The Mamba-2 mixer: a causal depthwise conv1d and a selective state-space scan (SSD), with
each sequence's state in a slot of the layer's state cache (the KV manager hands each running
request a slot), so a prompt can arrive in chunks and decode one token at a time.

Per sequence of L new tokens, x_t, B_t, C_t and dt_t come from the input projection and the
conv, and the state h [heads, head_dim, state] follows
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t,      y_t = C_t . h_t + D x_t,
then y is normed with the gate z (gated RMSNorm) and projected out. `chunked_scan` computes this
in chunks of `chunk_size` (quadratic inside a chunk, the recurrence only between chunks, as
the SSD paper does); `sequential_scan` is the plain recurrence it is checked against. Decode
rows (one new token each) take one batched recurrence step.

State per sequence slot: conv [conv_dim, conv_kernel - 1] (the last inputs of the conv) and
ssm [heads, head_dim, state], both float32 (the SSM state accumulates over the whole
sequence). On CPU a decode step runs as one native call per layer (csrc/ssm.cpp, checked
against the torch step here) where the native kernels build. Parameter names are Hugging Face's (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`,
`norm`, `out_proj`), so checkpoints load as they are. No tensor parallelism (heads are not
split) and no native kernel yet.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.factory import LayerFactory

# The chunk of the prompt scan. The result does not depend on it (up to float32 rounding); the
# work does: quadratic inside a chunk, linear across. 64 is the fastest here (a 1024-token scan
# of 24 heads of 64 x 128: 18 ms at 64 against 37 at the checkpoints' usual 256).
SCAN_CHUNK = 64


@dataclass(frozen=True)
class SSMSequence:
    """One sequence's rows in a step and where its state lives."""

    start: int  # first packed row
    length: int  # rows (new tokens) this step
    slot: int  # its state slot in the layer's cache
    fresh: bool  # no tokens before this step: the state starts at zero


@dataclass(frozen=True)
class SSMBatch:
    """A step's sequences for the state-space layers, indexed once for all of them."""

    chunks: tuple[SSMSequence, ...]  # prompt chunks and first tokens: the chunked scan
    decode_rows: torch.Tensor | None  # [b] packed rows of the one-token continuations
    decode_slots: torch.Tensor | None  # [b] their state slots
    single_slot: int | None  # the slot when b == 1 (its state is updated through a view)

    @classmethod
    def of(cls, seqs: Sequence[SSMSequence], device: torch.device | str = "cpu") -> SSMBatch:
        decodes = [s for s in seqs if s.length == 1 and not s.fresh]
        chunks = tuple(s for s in seqs if s.length > 1 or s.fresh)
        if not decodes:
            return cls(chunks, None, None, None)
        rows = torch.tensor([s.start for s in decodes], device=device)
        slots = torch.tensor([s.slot for s in decodes], device=device)
        return cls(chunks, rows, slots, decodes[0].slot if len(decodes) == 1 else None)


def sequential_scan(x, dt, A, B, C, h0):
    """The recurrence token by token. x [L, h, p], dt [L, h], A [h], B/C [L, h, n],
    h0 [h, p, n] -> (y [L, h, p] without the D term, final state)."""
    h, ys = h0, []
    for t in range(x.shape[0]):
        decay = torch.exp(dt[t] * A)[:, None, None]  # [h, 1, 1]
        h = h * decay + (dt[t][:, None] * x[t])[:, :, None] * B[t][:, None, :]
        ys.append((h * C[t][:, None, :]).sum(-1))
    return torch.stack(ys), h


def chunked_scan(x, dt, A, B, C, h0, chunk_size: int):
    """The same scan in chunks. x [L, h, p], dt [L, h], A [h], B/C [L, g, n] per group (heads
    h // g share one), h0 [h, p, n] -> (y [L, h, p], final state). Laid out [chunk, head, row,
    ...] so every product is a batched matmul on contiguous blocks, and C.B is computed once
    per group rather than per head."""
    L, heads, p = x.shape
    groups, n = B.shape[1], B.shape[2]
    pad = -L % chunk_size
    if pad:  # dt = 0 rows neither decay nor add: the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, B, C))
    q, r = chunk_size, heads // groups
    xd = (x * dt[..., None]).unflatten(0, (-1, q)).permute(0, 2, 1, 3)  # [c, h, q, p]
    cum = (dt * A).unflatten(0, (-1, q)).cumsum(1).permute(0, 2, 1).contiguous()  # [c, h, q]
    Bg = B.unflatten(0, (-1, q)).permute(0, 2, 1, 3)  # [c, g, q, n]
    Cg = C.unflatten(0, (-1, q)).permute(0, 2, 1, 3)
    chunks = xd.shape[0]
    # inside a chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) xd_s
    decay = cum[..., :, None] - cum[..., None, :]  # [c, h, l, s]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = decay.masked_fill_(~causal, -torch.inf).exp_()
    cb = Cg @ Bg.transpose(-1, -2)  # [c, g, l, s]
    mix = (decay.reshape(chunks, groups, r, q, q) * cb[:, :, None]).reshape(chunks, heads, q, q)
    y = mix @ xd  # [c, h, q, p]
    # each chunk's own contribution to the state at its end, then the recurrence over chunks
    to_end = torch.exp(cum[..., -1:] - cum)  # [c, h, q]
    Bw = (Bg[:, :, None] * to_end.reshape(chunks, groups, r, q, 1)).reshape(chunks, heads, q, n)
    added = xd.transpose(-1, -2) @ Bw  # [c, h, p, n]
    starts, h = [], h0
    for k in range(chunks):
        starts.append(h)
        h = h * torch.exp(cum[k, :, -1])[:, None, None] + added[k]
    start_states = torch.stack(starts)  # [c, h, p, n]
    Ch = Cg[:, :, None].expand(chunks, groups, r, q, n).reshape(chunks, heads, q, n)
    y = y + (Ch @ start_states.transpose(-1, -2)) * torch.exp(cum)[..., None]
    return y.permute(0, 2, 1, 3).reshape(-1, heads, p)[:L], h


@functools.cache
def _native_decode():
    """csrc/ssm.cpp's decode step (native.load raises NativeUnavailable where it cannot build)."""
    from tokenmill.layers import native

    fn = native.load("ssm").ssm_decode_step
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, *[ptr] * 9, *[i64] * 7, ctypes.c_int]
    fn.restype = None
    return fn


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of channels (Mamba-2's `norm`), in float32."""

    def __init__(self, size: int, group_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(self.weight.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(
        self,
        factory: LayerFactory,
        prefix: str,
        hidden: int,
        heads: int,
        head_dim: int,
        state_size: int,
        groups: int,
        conv_kernel: int,
        chunk_size: int,
        eps: float,
        bias: bool = False,
        conv_bias: bool = True,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.state_size, self.groups = (
            heads,
            head_dim,
            state_size,
            groups,
        )
        self.inner, self.conv_kernel, self.chunk_size, self.dt_limit = inner, conv_kernel, chunk_size, dt_limit  # fmt: skip
        self.conv_dim = inner + 2 * groups * state_size
        dtype = factory.dtype
        self.in_proj = factory.linear(f"{prefix}.in_proj", hidden, [inner + self.conv_dim + heads], bias)  # fmt: skip
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                bias=conv_bias, dtype=dtype)  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(heads, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(heads, dtype=dtype))
        self.D = nn.Parameter(torch.ones(heads, dtype=dtype))
        self.norm = GatedRMSNorm(inner, inner // groups, eps, dtype)
        self.out_proj = factory.linear(f"{prefix}.out_proj", inner, [hidden], bias)

    native = None  # csrc/ssm.cpp's decode step, attached by the runner on CPU (attach_native)

    def attach_native(self) -> None:
        from tokenmill.layers.native import NativeUnavailable

        try:
            self.native = _native_decode()
        except NativeUnavailable as e:  # the torch step stays
            import logging

            logging.getLogger(__name__).info("torch Mamba-2 decode step (%s)", e)
            return
        self._w32 = self.conv1d.weight.detach()[:, 0, :].float().contiguous()  # [conv_dim, k]
        bias = self.conv1d.bias
        self._b32 = bias.detach().float().contiguous() if bias is not None else None
        self._A32 = -torch.exp(self.A_log.detach().float())
        self._D32 = self.D.detach().float().contiguous()

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One sequence's (conv state, ssm state) shapes."""
        return (self.conv_dim, self.conv_kernel - 1), (self.heads, self.head_dim, self.state_size)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        seqs: SSMBatch | Sequence[SSMSequence],
        conv_state: torch.Tensor,  # [slots, conv_dim, conv_kernel - 1], updated in place
        ssm_state: torch.Tensor,  # [slots, heads, head_dim, state] float32, updated in place
    ) -> torch.Tensor:
        batch = seqs if isinstance(seqs, SSMBatch) else SSMBatch.of(seqs, hidden.device)
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.heads], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # [T, h]
        A = -torch.exp(self.A_log.float())
        y = torch.empty(hidden.shape[0], self.heads, self.head_dim, dtype=torch.float32, device=hidden.device)  # fmt: skip
        if batch.decode_rows is not None:
            step = self._native_step if self.native is not None else self._decode_step
            step(batch, xbc, dt, A, y, conv_state, ssm_state)
        for s in batch.chunks:
            self._chunk(s, xbc, dt, A, y, conv_state, ssm_state)
        return self.out_proj(self.norm(y.flatten(1), z))

    def _ssm_inputs(self, xbc: torch.Tensor, per_head: bool = True):
        """Conv outputs [L, conv_dim] -> x [L, h, p], B and C [L, h, n] (groups repeated), or
        [L, g, n] per group."""
        n, g = self.state_size, self.groups
        x, B, C = xbc.float().split([self.inner, g * n, g * n], dim=-1)
        B, C = B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
        if per_head:
            B = B.repeat_interleave(self.heads // g, dim=-2)
            C = C.repeat_interleave(self.heads // g, dim=-2)
        return x.unflatten(-1, (self.heads, self.head_dim)), B, C

    def _chunk(self, s: SSMSequence, xbc, dt, A, y, conv_state, ssm_state) -> None:
        """A prompt chunk (or a first token): the conv over the kept inputs and these rows,
        then the chunked scan from the slot's state."""
        rows = slice(s.start, s.start + s.length)
        kept = conv_state[s.slot]
        if s.fresh:
            kept = torch.zeros_like(kept)
        window = torch.cat([kept, xbc[rows].t().to(kept.dtype)], dim=1)  # [conv_dim, k-1+L]
        w = self.conv1d.weight
        conv = F.conv1d(window[None].to(w.dtype), w, self.conv1d.bias, groups=self.conv_dim)
        conv_state[s.slot] = window[:, window.shape[1] - (self.conv_kernel - 1) :]
        x, B, C = self._ssm_inputs(F.silu(conv[0].t()), per_head=False)
        h0 = ssm_state[s.slot] if not s.fresh else torch.zeros_like(ssm_state[s.slot])
        out, h = chunked_scan(x, dt[rows], A, B, C, h0.float(), min(self.chunk_size, SCAN_CHUNK))
        ssm_state[s.slot] = h
        y[rows] = out + self.D.float()[:, None] * x

    def _native_step(self, batch: SSMBatch, xbc, dt, A, y, conv_state, ssm_state) -> None:
        """`_decode_step` as one native call (float32 states, as the runner allocates them)."""
        rows, slots = batch.decode_rows, batch.decode_slots
        assert rows is not None and slots is not None and self.native is not None
        b = rows.shape[0]
        x = xbc[rows].float().contiguous()
        d = dt[rows].contiguous()
        out = torch.empty(b, self.inner, dtype=torch.float32)
        bias = self._b32.data_ptr() if self._b32 is not None else None
        self.native(
            x.data_ptr(), x.stride(0), conv_state.data_ptr(), self._w32.data_ptr(), bias,
            d.data_ptr(), self._A32.data_ptr(), self._D32.data_ptr(), ssm_state.data_ptr(),
            slots.data_ptr(), out.data_ptr(), b, self.conv_dim, self.conv_kernel, self.heads,
            self.head_dim, self.state_size, self.groups, torch.get_num_threads(),
        )  # fmt: skip
        y[rows] = out.view(b, self.heads, self.head_dim)

    def _decode_step(self, batch: SSMBatch, xbc, dt, A, y, conv_state, ssm_state) -> None:
        """One token for each continuing sequence, as one batched recurrence step. The SSM
        state is updated in place (a slot's view for one sequence, else a gathered copy
        written back): it is the largest thing a decode step touches after the weights."""
        rows, slots = batch.decode_rows, batch.decode_slots
        assert rows is not None and slots is not None
        b = rows.shape[0]
        window = torch.cat([conv_state[slots], xbc[rows][:, :, None].to(conv_state.dtype)], dim=2)  # fmt: skip
        conv_state[slots] = window[:, :, 1:]
        w = self.conv1d.weight[:, 0, :]  # [conv_dim, k]
        conv = (window.to(w.dtype) * w).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, B, C = self._ssm_inputs(F.silu(conv))  # x [b, h, p], B/C [b, h, n]
        d = dt[rows]  # [b, h]
        single = batch.single_slot
        h = (
            ssm_state[single].unsqueeze(0)
            if single is not None
            else ssm_state.index_select(0, slots)
        )
        h.mul_(torch.exp(d * A)[:, :, None, None])  # [b, h, p, n]
        hp, n = b * self.heads, self.state_size
        flat = h.view(hp, self.head_dim, n)
        flat.baddbmm_((d[:, :, None] * x).reshape(hp, self.head_dim, 1), B.reshape(hp, 1, n))
        if single is None:
            ssm_state.index_copy_(0, slots, h)
        out = torch.bmm(flat, C.reshape(hp, n, 1)).view(b, self.heads, self.head_dim)
        y[rows] = out + self.D.float()[:, None] * x
