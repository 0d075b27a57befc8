"""Paged attention over a packed (varlen) batch, behind one backend interface.

The KV cache of one layer is a tensor [2, num_kv_heads, num_slots, head_dim] where
num_slots = num_blocks * block_size: slot `block_id * block_size + offset` holds one token's K
and V. Heads lead, so a gathered sequence is [kv_heads, len, head_dim] with each head's keys
contiguous, the layout SDPA reads fastest (1.4x over token-major on this CPU). The runner builds
`AttentionMetadata` once per step through `AttentionBackend.prepare_metadata`; every layer
reads it.

Batch layout (the runner's promise): the first `num_decode_tokens` tokens belong to requests
computing exactly one token (decodes); then come prefill spans, one per request, each computing
`end - start` tokens after `num_context` cached ones.

`TorchAttention` is the reference backend: it runs on every device with torch's
scaled_dot_product_attention. Faster kernels become other backends; this one stays the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # first token of the span in the packed batch
    end: int  # one past its last token
    num_context: int  # tokens of this request already cached before this step
    context_slots: torch.Tensor | None  # [num_context + n] slots of every key, None if no context
    mask: torch.Tensor | None  # [n, num_context + n] True = may attend; None = plain causal


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new K/V is written to
    num_decode_tokens: int  # leading tokens that are single-token decodes
    block_size: int  # tokens per KV block
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], padded with a zero block
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] True = real key
    decode_lens: torch.Tensor | None = (
        None  # [num_decodes] int32 keys of each decode, new one included
    )
    prefills: list[PrefillSpan] = field(default_factory=list)
    ssm: object = None  # layers/mamba.SSMBatch: the state-space layers' sequences and slots


@dataclass(frozen=True)
class SequenceSlice:
    """One request's part of a step, as the metadata needs it."""

    block_ids: Sequence[int]  # its block table
    num_computed_tokens: int  # keys cached before this step
    num_new_tokens: int  # tokens computed this step


def slots_of(table: Sequence[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Cache slots of positions [start, end) of a sequence with block table `table`."""
    pos = np.arange(start, end)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def _decode_keys(decodes: list[SequenceSlice], block_size: int, pad_slot: int, device):
    """Block tables of the decodes, padded with the zeroed pad block, the key mask and the
    number of keys of each."""
    if not decodes:
        return None, None, None
    lens = [s.num_computed_tokens + 1 for s in decodes]
    max_blocks = -(-max(lens) // block_size)
    tables = np.full((len(decodes), max_blocks), pad_slot // block_size, dtype=np.int64)
    for row, (s, n) in enumerate(zip(decodes, lens)):
        used = -(-n // block_size)
        tables[row, :used] = s.block_ids[:used]
    mask = np.arange(max_blocks * block_size)[None, :] < np.asarray(lens)[:, None]
    return (
        torch.from_numpy(tables).to(device),
        torch.from_numpy(mask[:, None, None, :]).to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
    )


def _prefill_span(s: SequenceSlice, start: int, block_size: int, device) -> PrefillSpan:
    c, n = s.num_computed_tokens, s.num_new_tokens
    if c == 0:
        return PrefillSpan(start, start + n, 0, None, None)
    slots = torch.from_numpy(slots_of(s.block_ids, 0, c + n, block_size)).to(device)
    mask = np.arange(c + n)[None, :] <= (c + np.arange(n))[:, None]  # [n, c + n]
    return PrefillSpan(start, start + n, c, slots, torch.from_numpy(mask).to(device))


class AttentionBackend:
    """Interface: write the new K/V into the cache, then attend over cached keys."""

    @staticmethod
    def prepare_metadata(
        seqs: Sequence[SequenceSlice],
        block_size: int,
        pad_slot: int,
        device: torch.device,
        per_token: bool = False,
    ) -> AttentionMetadata:
        """The step's metadata; `seqs` in batch order, single-token decodes first. Every
        backend here reads this one layout (storage differs, the block walk does not).

        `per_token` (batch-invariant mode): every new token attends as a decode does, one row
        per token over its sequence's keys up to itself, read from the cache after this step's
        K/V are written. A token's attention is then one computation whatever else the step
        holds and however its prompt was cut into chunks."""
        if per_token:
            seqs = [
                SequenceSlice(s.block_ids, s.num_computed_tokens + j, 1)
                for s in seqs
                for j in range(s.num_new_tokens)
            ]
        num_decodes = 0
        while num_decodes < len(seqs) and seqs[num_decodes].num_new_tokens == 1:
            num_decodes += 1
        slot_mapping = [
            slots_of(
                s.block_ids,
                s.num_computed_tokens,
                s.num_computed_tokens + s.num_new_tokens,
                block_size,
            )
            for s in seqs
        ]
        tables, mask, lens = _decode_keys(list(seqs[:num_decodes]), block_size, pad_slot, device)
        spans, start = [], 0
        for i, s in enumerate(seqs):
            if i >= num_decodes:
                spans.append(_prefill_span(s, start, block_size, device))
            start += s.num_new_tokens
        return AttentionMetadata(
            slot_mapping=torch.as_tensor(np.concatenate(slot_mapping)).to(device),
            num_decode_tokens=num_decodes,
            block_size=block_size,
            decode_block_tables=tables,
            decode_mask=mask,
            decode_lens=lens,
            prefills=spans,
        )

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_kv_heads, num_slots, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    """KV stored in the model dtype. Subclasses change the storage through three hooks: `write`
    (returns K/V as attention must see them), `gather_blocks` and `gather_slots`."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def forward(self, q, k, v, kv_cache, meta):
        k, v = self.write(kv_cache, meta.slot_mapping, k, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        for span in meta.prefills:
            s, e = span.start, span.end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], kv_cache, span)
        return out

    def write(self, kv_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        kv_cache[0].index_copy_(1, slots, k.transpose(0, 1))
        kv_cache[1].index_copy_(1, slots, v.transpose(0, 1))
        return k, v

    def gather_blocks(self, kv_cache, tables: torch.Tensor, block_size: int):
        """Whole blocks -> keys, values [kv_heads, len(tables) * block_size, head_dim]."""
        # Rows of block_size * head_dim: 1.7x faster than per-token rows; index_select is ~3x
        # faster than advanced indexing.
        blocks = kv_cache.view(2, kv_cache.shape[1], -1, block_size * kv_cache.shape[-1])
        kv = blocks.index_select(2, tables)
        return kv[0].view(kv_cache.shape[1], -1, kv_cache.shape[-1]), kv[1].view(
            kv_cache.shape[1], -1, kv_cache.shape[-1]
        )

    def gather_slots(self, kv_cache, slots: torch.Tensor):
        """Token slots -> keys, values [kv_heads, len(slots), head_dim]."""
        return kv_cache[0].index_select(1, slots), kv_cache[1].index_select(1, slots)

    def _decode(self, q: torch.Tensor, kv_cache, meta: AttentionMetadata):
        num_seqs, num_heads, head_dim = q.shape
        tables = meta.decode_block_tables.view(-1)  # type: ignore[union-attr]
        keys, values = self.gather_blocks(kv_cache, tables, meta.block_size)
        num_kv_heads = keys.shape[0]
        group = num_heads // num_kv_heads
        # GQA without repeating K/V: the heads of one group act as `group` queries of one head.
        qg = q.view(num_seqs, num_kv_heads, group, head_dim)
        shape = (num_kv_heads, num_seqs, -1, head_dim)
        keys = keys.view(shape).transpose(0, 1)  # [seqs, kv_heads, len, dim]
        values = values.view(shape).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            qg, keys, values, attn_mask=meta.decode_mask, scale=self.scale
        )  # [seqs, kv_heads, group, dim]
        return o.reshape(num_seqs, num_heads, head_dim)

    def _prefill(self, q, k, v, kv_cache, span: PrefillSpan):
        if span.context_slots is not None:
            keys, values = self.gather_slots(kv_cache, span.context_slots)  # [kv_heads, keys, dim]
        else:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, heads, n, dim]
            keys.unsqueeze(0),  # [1, kv_heads, keys, dim]
            values.unsqueeze(0),
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1)  # [n, heads, dim]
