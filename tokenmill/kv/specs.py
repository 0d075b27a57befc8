"""Cache specs: what each layer keeps per request, and the one place KV memory is sized.

An attention layer caches K and V per token (`AttentionSpec`); a state-space layer keeps a
fixed-size state per request (`StateSpec`). `plan_kv_cache` turns the specs, a byte budget and the
block size into state slots (one per request that can run) and a number of blocks, or an error
that says how much memory one full-length sequence needs. Pure Python; no torch. It does not allocate: the worker does, from the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSpec:
    num_kv_heads: int
    head_size: int
    bytes_per_head_token: int  # K or V of one head and token, scales included

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.bytes_per_head_token  # K and V


@dataclass(frozen=True)
class StateSpec:
    """A state-space layer's fixed-size state per request, whatever its length."""

    shapes: tuple[tuple[int, ...], ...]  # e.g. (conv state, SSM state) of one request
    element_bytes: tuple[int, ...]  # bytes per element of each

    @property
    def bytes_per_request(self) -> int:
        total = 0
        for shape, size in zip(self.shapes, self.element_bytes, strict=True):
            n = size
            for d in shape:
                n *= d
            total += n
        return total


CacheSpec = AttentionSpec | StateSpec


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int  # blocks of the pool; one more (the pad block) is allocated by the worker
    block_size: int  # tokens per block
    bytes_per_block: int  # over every attention layer (0: no attention: bookkeeping blocks)
    num_state_slots: int = 0  # requests whose state-space layers' state is held at once
    bytes_per_state: int = 0  # one request's state over every state-space layer

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + self.num_state_slots * self.bytes_per_state


def bytes_per_token(specs: Sequence[CacheSpec]) -> int:
    """KV bytes one token takes over every attention layer."""
    return sum(s.bytes_per_token for s in specs if isinstance(s, AttentionSpec))


def bytes_per_state(specs: Sequence[CacheSpec]) -> int:
    """State bytes one request takes over every state-space layer."""
    return sum(s.bytes_per_request for s in specs if isinstance(s, StateSpec))


def plan_kv_cache(
    specs: Sequence[CacheSpec],
    memory_bytes: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int = 1,
) -> KVCachePlan:
    """As many blocks as `memory_bytes` holds after the state slots (one per request that can
    run, up to max_num_seqs); at least one full-length sequence must fit. A model with no
    attention layer gets bookkeeping blocks (no memory) for every slot's full length."""
    per_block = bytes_per_token(specs) * block_size
    per_state = bytes_per_state(specs)
    needed = -(-max_model_len // block_size)
    slots = 0
    if per_state:
        slots = min(max_num_seqs, memory_bytes // per_state)
        if slots < 1:
            raise ValueError(
                f"kv_cache_memory of {memory_bytes / 2**20:.1f} MiB holds no request's state "
                f"({per_state} bytes each); raise kv_cache_memory"
            )
        memory_bytes -= slots * per_state
        if not per_block:
            return KVCachePlan(slots * needed, block_size, 0, slots, per_state)
    elif per_block <= 0:
        raise ValueError("the model declares no attention cache; nothing to size")
    num_blocks = memory_bytes // per_block
    if num_blocks < needed:
        raise ValueError(
            f"kv_cache_memory of {memory_bytes / 2**20:.1f} MiB holds {num_blocks} blocks, but "
            f"one sequence of max_model_len={max_model_len} needs {needed}; raise "
            f"kv_cache_memory to at least {needed * per_block + slots * per_state} bytes or "
            "lower max_model_len"
        )
    return KVCachePlan(num_blocks, block_size, per_block, slots, per_state)
