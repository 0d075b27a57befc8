"""Cache specs: what each layer keeps per request, and the one place KV memory is sized.

An attention layer caches K and V per token (`AttentionSpec`); a state-space layer will keep a
fixed-size state per request (`StateSpec`). `plan_kv_cache` turns the specs, a byte budget and the
block size into a number of blocks, or an error that says how much memory one full-length
sequence needs. Pure Python; no torch. It does not allocate: the worker does, from the plan.
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
    shapes: tuple[tuple[int, ...], ...]  # e.g. (conv state, SSM state) of one request
    bytes_per_element: int

    @property
    def bytes_per_request(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total * self.bytes_per_element


CacheSpec = AttentionSpec | StateSpec


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int  # blocks of the pool; one more (the pad block) is allocated by the worker
    block_size: int  # tokens per block
    bytes_per_block: int  # over every attention layer

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def bytes_per_token(specs: Sequence[CacheSpec]) -> int:
    """KV bytes one token takes over every attention layer."""
    return sum(s.bytes_per_token for s in specs if isinstance(s, AttentionSpec))


def plan_kv_cache(
    specs: Sequence[CacheSpec], memory_bytes: int, block_size: int, max_model_len: int
) -> KVCachePlan:
    """As many blocks as `memory_bytes` holds; at least one full-length sequence must fit."""
    per_block = bytes_per_token(specs) * block_size
    if per_block <= 0:
        raise ValueError("the model declares no attention cache; nothing to size")
    if any(isinstance(s, StateSpec) for s in specs):
        raise NotImplementedError("state-space layers (StateSpec) have no state slots yet")
    num_blocks = memory_bytes // per_block
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise ValueError(
            f"kv_cache_memory of {memory_bytes / 2**20:.1f} MiB holds {num_blocks} blocks, but "
            f"one sequence of max_model_len={max_model_len} needs {needed}; raise "
            f"kv_cache_memory to at least {needed * per_block} bytes or lower max_model_len"
        )
    return KVCachePlan(num_blocks, block_size, per_block)
