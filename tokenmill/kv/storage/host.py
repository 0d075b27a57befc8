"""Block-granular copies between the device KV pool and host memory.

The runner's KV tensors are [2, kv_heads, slots, head_dim] per layer (a quantized cache adds
[2, kv_heads, slots, 1] scales); slots are (num_blocks + 1) x block_size, so a view
[2, kv_heads, num_blocks + 1, block_size, ...] addresses whole blocks. The host tier keeps, per
such tensor, [host_blocks, 2, kv_heads, block_size, ...]: one slot's bytes are exactly one
device block's, so blocks come back bit-identical. On CUDA the host tensors are pinned, and
blocks coming back go through pinned staging, so their copies are DMAs on the caller's current
stream (the loader's own: mover.py) that do not wait for the forward.

A compressed tier (`BlockCodec` with kv_tier_dtype int8 or fp8_e4m3) keeps each 16- or 32-bit
KV tensor of a block as codes of the same shape plus one float32 scale per token and head (the
scheme of the int8 KV cache, layers/kv_quant.py): a bf16 block of head_dim 64 in 0.53 of its
bytes. Its blocks come back dequantized, not bit-identical; the disk tier stores the same codes. The
codes cross to the device before they are decoded: a compressed tier moves its own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.kv.storage.codes import KV_DTYPES, STORAGE, dequantize, quantize
from tokenmill.kv.storage.memory import host_zeros

Shapes = list[tuple[torch.Size, torch.dtype]]


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

    def block_shapes(self) -> Shapes:
        """One block's shape and dtype per KV tensor: [2, kv_heads, block_size, ...]."""
        return [(v[:, :, 0].shape, v.dtype) for v in self.views]

    def gather(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Copies of these blocks, per KV tensor [n, 2, kv_heads, block_size, ...]."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return [v.index_select(2, idx).movedim(2, 0) for v in self.views]

    def upload(self, data: Sequence[torch.Tensor], pinned: bool = False) -> list[torch.Tensor]:
        """Host tensors onto the device, asynchronously on CUDA (through pinned memory, unless
        they are `pinned` already) on the current stream; as they are on CPU."""
        if self.device.type != "cuda":
            return list(data)
        return [(d if pinned else d.pin_memory()).to(self.device, non_blocking=True) for d in data]

    def scatter(self, blocks: Sequence[int], data: Sequence[torch.Tensor]) -> None:
        """Write data (per KV tensor [n, 2, kv_heads, block_size, ...]) into these blocks."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for v, d in zip(self.views, data, strict=True):
            v.index_copy_(2, idx, d.to(v.device, non_blocking=True).movedim(0, 2))


class BlockCodec:
    """How the tiers hold a block: as the pool does ("auto"), or compressed (int8, fp8_e4m3)."""

    def __init__(self, device_shapes: Shapes, tier_dtype: str = "auto") -> None:
        self.device_shapes = list(device_shapes)
        self.tier_dtype = tier_dtype
        self.kv_dtype = KV_DTYPES[tier_dtype] if tier_dtype != "auto" else None
        if self.kv_dtype is not None and any(
            not d.is_floating_point or d.itemsize < 2 for _, d in self.device_shapes
        ):
            raise ValueError(f"kv_tier_dtype={tier_dtype} compresses 16- or 32-bit KV blocks only")

    @property
    def is_exact(self) -> bool:
        return self.kv_dtype is None

    def shapes(self) -> Shapes:
        """One block's tensors in the tiers: [2, kv_heads, block_size, ...] each."""
        if self.kv_dtype is None:
            return self.device_shapes
        code = STORAGE[self.kv_dtype]
        return [x for shape, _ in self.device_shapes
                for x in ((shape, code), (torch.Size((*shape[:-1], 1)), torch.float32))]  # fmt: skip

    @property
    def bytes_per_block(self) -> int:
        return sum(shape.numel() * dtype.itemsize for shape, dtype in self.shapes())

    def encode(self, data: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Device-format blocks (per KV tensor [n, ...]) -> the tier's tensors."""
        if self.kv_dtype is None:
            return list(data)
        return [x for d in data for x in quantize(d, self.kv_dtype)]

    def decode(self, data: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tier's tensors -> device-format blocks."""
        if self.kv_dtype is None:
            return list(data)
        return [
            dequantize(data[2 * i], data[2 * i + 1], self.kv_dtype, dtype)
            for i, (_, dtype) in enumerate(self.device_shapes)
        ]


class HostBlocks:
    """`num_blocks` host slots, each one block in the codec's format."""

    def __init__(
        self, device_blocks: BlockViews, num_blocks: int, codec: BlockCodec | None = None
    ) -> None:
        self.codec = codec or BlockCodec(device_blocks.block_shapes())
        pin = device_blocks.device.type == "cuda"
        self.tensors = [
            torch.empty((num_blocks, *shape), dtype=dtype, pin_memory=True)
            if pin
            else host_zeros((num_blocks, *shape), dtype)
            for shape, dtype in self.codec.shapes()
        ]
        self.device_blocks = device_blocks

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def save(self, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host slots (before anything overwrites the device blocks)."""
        idx = torch.tensor(slots, dtype=torch.long)
        data = self.codec.encode(self.device_blocks.gather(blocks))
        for host, d in zip(self.tensors, data, strict=True):
            host.index_copy_(0, idx, d.to("cpu"))

    def restore(self, slots: Sequence[int], blocks: Sequence[int]) -> None:
        """Host slots -> device blocks: the slots gathered (into pinned staging on CUDA), moved,
        then decoded and placed on the device."""
        idx = torch.tensor(slots, dtype=torch.long)
        pin = self.device_blocks.device.type == "cuda"
        staged = []
        for t in self.tensors:
            out = torch.empty((len(slots), *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
            staged.append(torch.index_select(t, 0, idx, out=out))
        data = self.codec.decode(self.device_blocks.upload(staged, pinned=True))
        self.device_blocks.scatter(blocks, data)

    def block(self, slot: int) -> list[torch.Tensor]:
        """A copy of one slot in the tier's format (for a file)."""
        return [t[slot].clone() for t in self.tensors]
