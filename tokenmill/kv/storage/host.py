"""Block-granular copies between the device KV pool and host memory.

The runner's KV tensors are [2, kv_heads, slots, head_dim] per layer (a quantized cache adds
[2, kv_heads, slots, 1] scales); slots are (num_blocks + 1) x block_size, so a view
[2, kv_heads, num_blocks + 1, block_size, ...] addresses whole blocks. The host tier keeps, per
such tensor, [host_blocks, 2, kv_heads, block_size, ...]: one slot's bytes are exactly one
device block's, so blocks come back bit-identical. On CUDA the host tensors are pinned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.kv.storage.memory import host_zeros


def flat_tensors(kv_caches: Sequence) -> list[torch.Tensor]:
    """Every tensor of the KV cache: one per layer, or (codes, scales) for a quantized one."""
    return [t for c in kv_caches for t in (c if isinstance(c, tuple) else (c,))]


class BlockViews:
    """The device pool seen as blocks: gather a set of blocks out, scatter blocks in."""

    def __init__(self, kv_caches: Sequence, block_size: int) -> None:
        self.views = [t.unflatten(2, (-1, block_size)) for t in flat_tensors(kv_caches)]
        self.device = self.views[0].device

    @property
    def bytes_per_block(self) -> int:
        return sum(v[:, :, 0].numel() * v.element_size() for v in self.views)

    def block_shapes(self) -> list[tuple[torch.Size, torch.dtype]]:
        """One block's shape and dtype per KV tensor: [2, kv_heads, block_size, ...]."""
        return [(v[:, :, 0].shape, v.dtype) for v in self.views]

    def gather(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Copies of these blocks, per KV tensor [n, 2, kv_heads, block_size, ...]."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return [v.index_select(2, idx).movedim(2, 0) for v in self.views]

    def scatter(self, blocks: Sequence[int], data: Sequence[torch.Tensor]) -> None:
        """Write data (per KV tensor [n, 2, kv_heads, block_size, ...]) into these blocks."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for v, d in zip(self.views, data, strict=True):
            v.index_copy_(2, idx, d.to(v.device, non_blocking=True).movedim(0, 2))


class HostBlocks:
    """`num_blocks` host slots shaped like the device pool's blocks."""

    def __init__(self, device_blocks: BlockViews, num_blocks: int) -> None:
        pin = device_blocks.device.type == "cuda"
        self.tensors = [
            torch.empty((num_blocks, *shape), dtype=dtype, pin_memory=True)
            if pin
            else host_zeros((num_blocks, *shape), dtype)
            for shape, dtype in device_blocks.block_shapes()
        ]
        self.device_blocks = device_blocks

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def save(self, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host slots (before anything overwrites the device blocks)."""
        idx = torch.tensor(slots, dtype=torch.long)
        for host, data in zip(self.tensors, self.device_blocks.gather(blocks), strict=True):
            host.index_copy_(0, idx, data.to("cpu"))

    def restore(self, slots: Sequence[int], blocks: Sequence[int]) -> None:
        """Host slots -> device blocks."""
        idx = torch.tensor(slots, dtype=torch.long)
        self.device_blocks.scatter(blocks, [t.index_select(0, idx) for t in self.tensors])

    def block(self, slot: int) -> list[torch.Tensor]:
        """A copy of one slot, per KV tensor [2, kv_heads, block_size, ...] (for a file)."""
        return [t[slot].clone() for t in self.tensors]
