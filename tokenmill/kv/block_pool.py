"""BlockPool: the physical KV blocks, their reference counts, the free queue and the prefix cache.

Invariants:
- a block is in the free queue if and only if its ref_cnt is 0;
- the free queue is in eviction order: the least recently freed block is taken first, so cached
  prefixes that were used recently survive longest (LRU);
- a block with a hash is findable through `cached` until it is taken for new content.
Pure Python; the tensors that hold the K/V live in the runner and are indexed by block id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are final


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = True,
        on_evict: Callable[[int, bytes], None] | None = None,
    ) -> None:
        """`on_evict(block_id, block_hash)` hears of each cached block about to be reused (its
        content still intact until the step that takes it runs): the KV tiers offload it."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.on_evict = on_evict
        self.num_cache_queries = 0  # blocks looked up in the prefix cache
        self.num_cache_hits = 0  # of those, found

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by some request; 0 once every request has finished or aborted."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num: int) -> list[int]:
        """Take `num` free blocks (evicting their cached content); caller checked availability."""
        if num > len(self._free):
            raise RuntimeError(f"asked for {num} blocks, {len(self._free)} free")
        out = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                    if self.on_evict is not None:
                        self.on_evict(block_id, block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue's tail.

        Callers pass a request's blocks in reverse order so a sequence's tail is evicted before
        its head (heads are the prefixes other requests share).
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def share(self, block_id: int) -> None:
        """Add a reference to a block in use or in the cache (prefix hit, fork)."""
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1

    def lookup(self, block_hash: bytes) -> int | None:
        self.num_cache_queries += 1
        block_id = self.cached.get(block_hash)
        if block_id is not None:
            self.num_cache_hits += 1
        return block_id

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Record a full block's hash; the first block with a given hash stays the canonical one."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block_id)

    def free_block_ids(self) -> list[int]:
        """The free queue, in eviction order (the next block `allocate` takes first)."""
        return list(self._free)

    def is_shared(self, block_id: int) -> bool:
        return self.blocks[block_id].ref_cnt > 1

    def is_free(self, block_id: int) -> bool:
        return self.blocks[block_id].ref_cnt == 0

    @property
    def hit_rate(self) -> float:
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only allowed when no block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
