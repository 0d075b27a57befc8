"""The KV tier policy: which cached blocks live in host memory and on disk, and the moves.

Below the device pool sit up to two tiers, each a fixed number of block-sized slots (host
memory, then a disk directory) whose entries leave in S3-FIFO order (`_Tier`). The device pool
hands every cached full block it evicts to `offload`: it goes to the host tier (whose evicted
entry goes down to disk), or straight to disk when there is no host tier. A prefix miss on the
device asks `find`; hits are brought back by `load` as one job per step, asynchronously, and the
job's entries stay pinned (never evicted) until `loaded` reports it done. Tiers are inclusive: a
block brought back keeps its copy below, so evicting it again moves nothing.

The policy decides; the worker's storage (kv/storage/) only does what `take_ops` says, in the
order `TierOps` states. Host slots and disk entries are the policy's to hand out, so the two sides
agree on every slot without asking each other. Pure Python; no torch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenmill.kv.moves import BlockLoad, TierOps, TierStats


@dataclass
class _Counts:
    hits: int = 0  # blocks found here on a device miss
    misses: int = 0  # blocks asked of this tier and not found
    blocks_in: int = 0  # blocks written into this tier
    blocks_out: int = 0  # blocks loaded from this tier into the device pool
    evicted: int = 0  # blocks this tier dropped (moved down or lost)


@dataclass
class _Tier:
    """A tier's index (block hash -> slot) and the queues that choose which entry leaves: S3-FIFO
    (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023). A new entry
    joins `small` (a tenth of the tier); reaching small's end, one used since (a lookup found
    it, or the pool evicted it again) moves on to `main`, an unused one leaves, its hash kept in
    `ghost` so that a block offloaded again soon after goes straight to main. `main` is a CLOCK:
    an entry used since the hand last passed (up to 3 uses) goes round again, else it leaves.

    Chosen over LRU on recorded multi-turn chat traces (benchmarks/kv_tier_policies.py): with
    conversations taking turns, LRU drops each conversation's blocks just before it returns; at
    a host tier of 40% of the working set it loaded 25% of the reusable blocks, S3-FIFO 54%, LFU
    59% (but LFU never lets go of blocks that stop being used: after a change of workload it
    found 0.1%, S3-FIFO as much as LRU or more).
    """

    name: str
    capacity: int
    lru: bool = False  # kv_tier_policy lru: `main` alone, in order of last use (the former policy)
    entries: dict[bytes, int] = field(default_factory=dict)  # in the order they came
    small: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # oldest first
    main: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # the CLOCK's order
    ghost: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # hashes only
    uses: dict[bytes, int] = field(default_factory=dict)  # since entering / the hand passed
    freed: list[int] = field(default_factory=list)  # slots given back; never-used ones follow
    next_slot: int = 0  # slots [next_slot, capacity) were never used (no list of millions)
    pins: dict[bytes, int] = field(default_factory=dict)  # loads in flight per entry
    counts: _Counts = field(default_factory=_Counts)

    def has_room(self) -> bool:
        return bool(self.freed) or self.next_slot < self.capacity

    def add(self, block_hash: bytes) -> int:
        """A new entry (there is room); its slot."""
        if self.freed:
            slot = self.freed.pop()
        else:
            slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.entries[block_hash] = slot
        self.uses[block_hash] = 0
        if self.lru:
            self.main[block_hash] = None
        elif block_hash in self.ghost:
            del self.ghost[block_hash]
            self.main[block_hash] = None
        else:
            self.small[block_hash] = None
        return slot

    def touch(self, block_hash: bytes) -> None:
        """The entry was used: a lookup found it, or the pool evicted its block again."""
        self.uses[block_hash] = min(self.uses[block_hash] + 1, 3)
        if self.lru:
            self.main.move_to_end(block_hash)

    def evict(self) -> tuple[bytes, int] | None:
        """Choose an entry no load is reading and remove it: (its hash, its freed slot), or
        None when every entry is pinned."""
        if self.lru:
            block_hash = self._free(self.main)
            if block_hash is None:
                return None
            del self.main[block_hash]
            return block_hash, self._drop(block_hash)
        if self._free(self.small) is not None and (
            len(self.small) >= max(1, self.capacity // 10) or self._free(self.main) is None
        ):
            while (block_hash := self._free(self.small)) is not None:
                del self.small[block_hash]
                if self.uses[block_hash]:
                    self.main[block_hash] = None  # used again while new: it stays
                    continue
                self.ghost[block_hash] = None
                if len(self.ghost) > self.capacity:
                    self.ghost.popitem(last=False)
                return block_hash, self._drop(block_hash)
        for _ in range(4 * len(self.main) + 1):  # each round takes a use: it ends
            block_hash = self._free(self.main)
            if block_hash is None:
                return None
            if self.uses[block_hash]:
                self.uses[block_hash] -= 1
                self.main.move_to_end(block_hash)
                continue
            del self.main[block_hash]
            return block_hash, self._drop(block_hash)
        return None

    def remove(self, block_hash: bytes) -> None:
        """An entry the storage lost (a failed read or write): gone, not remembered."""
        self.small.pop(block_hash, None)
        self.main.pop(block_hash, None)
        self._drop(block_hash)

    def _free(self, queue: OrderedDict[bytes, None]) -> bytes | None:
        return next((h for h in queue if h not in self.pins), None)

    def _drop(self, block_hash: bytes) -> int:
        slot = self.entries.pop(block_hash)
        del self.uses[block_hash]
        self.freed.append(slot)
        return slot

    def pin(self, block_hash: bytes) -> None:
        self.pins[block_hash] = self.pins.get(block_hash, 0) + 1

    def unpin(self, block_hash: bytes) -> None:
        left = self.pins.pop(block_hash) - 1
        if left:
            self.pins[block_hash] = left


POLICIES = ("s3fifo", "lru")


class TierPolicy:
    def __init__(
        self, host_blocks: int, disk_blocks: int, bytes_per_block: int, policy: str = "s3fifo"
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"kv_tier_policy must be one of {POLICIES}, got {policy!r}")
        self.host = _Tier("host", host_blocks, policy == "lru")
        self.disk = _Tier("disk", disk_blocks, policy == "lru")
        self.bytes_per_block = bytes_per_block
        self._next_job = 0
        self._jobs: dict[int, tuple[float, list[tuple[bytes, _Tier]]]] = {}  # in flight
        self._host_to_disk: list[tuple[int, bytes]] = []
        self._disk_drops: list[bytes] = []
        self._device_to_host: list[tuple[int, int]] = []
        self._device_to_disk: list[tuple[int, bytes]] = []
        self._loads: list[BlockLoad] = []
        self.num_lost = 0  # evicted blocks no tier could take (every slot pinned)
        self.load_seconds_sum = 0.0  # finished jobs, from reserve to reported done
        self.load_count = 0

    @property
    def is_enabled(self) -> bool:
        return self.host.capacity > 0 or self.disk.capacity > 0

    @property
    def num_loads_in_flight(self) -> int:
        return len(self._jobs)

    # ---- down: the device pool evicts ------------------------------------------------------
    def offload(self, device_block: int, block_hash: bytes) -> None:
        """The pool is about to reuse `device_block`, which holds the block `block_hash`."""
        if block_hash in self.host.entries:
            self.host.touch(block_hash)
        elif self.host.capacity:
            if not self._host_room():
                self.num_lost += 1
                return
            slot = self.host.add(block_hash)
            self.host.counts.blocks_in += 1
            self._device_to_host.append((device_block, slot))
        elif block_hash in self.disk.entries:
            self.disk.touch(block_hash)
        elif self.disk.capacity and self._make_disk_room():
            self.disk.add(block_hash)
            self.disk.counts.blocks_in += 1
            self._device_to_disk.append((device_block, block_hash))
        else:
            self.num_lost += 1

    def _host_room(self) -> bool:
        if self.host.has_room():
            return True
        evicted = self.host.evict()
        if evicted is None:
            return False
        self.host.counts.evicted += 1
        self._demote(*evicted)
        return True

    def _demote(self, block_hash: bytes, host_slot: int) -> None:
        """A block leaving the host tier goes to disk, unless it is there already. One that
        entered the host tier this same step is still only on its device block: it goes to
        disk from there (its slot is refilled before the worker would copy it)."""
        pending = next((i for i, (_, s) in enumerate(self._device_to_host) if s == host_slot), None)
        device_block = self._device_to_host.pop(pending)[0] if pending is not None else None
        if block_hash in self.disk.entries:
            self.disk.touch(block_hash)
        elif self.disk.capacity and self._make_disk_room():
            self.disk.add(block_hash)
            self.disk.counts.blocks_in += 1
            if device_block is None:
                self._host_to_disk.append((host_slot, block_hash))
            else:
                self._device_to_disk.append((device_block, block_hash))
        else:
            self.num_lost += 1

    def _cancel_write(self, block_hash: bytes) -> bool:
        """Drop a disk write decided this same step (the block leaves before it was written)."""
        for ops in (self._host_to_disk, self._device_to_disk):
            for i, (_, h) in enumerate(ops):
                if h == block_hash:
                    del ops[i]
                    return True
        return False

    def _make_disk_room(self) -> bool:
        if self.disk.has_room():
            return True
        evicted = self.disk.evict()
        if evicted is None:
            return False
        self.disk.counts.evicted += 1
        if not self._cancel_write(evicted[0]):
            self._disk_drops.append(evicted[0])
        return True

    # ---- up: a prefix misses the device ----------------------------------------------------
    def find(self, block_hash: bytes) -> bool:
        """Whether a lower tier holds the block (counted as a hit or miss per tier asked)."""
        for tier in (self.host, self.disk):
            if not tier.capacity:
                continue
            if block_hash in tier.entries:
                tier.counts.hits += 1
                return True
            tier.counts.misses += 1
        return False

    def reserve(self, hashes: Iterable[bytes]) -> int:
        """Pin blocks that `find` found, each in the highest tier holding it, so that nothing
        evicts them while device blocks are found for them; returns the job id for `start`
        (or `cancel`), which `loaded` will report."""
        job_id = self._next_job
        self._next_job += 1
        pinned: list[tuple[bytes, _Tier]] = []
        for block_hash in hashes:
            tier = self.host if block_hash in self.host.entries else self.disk
            tier.touch(block_hash)  # a use: the lookup found it
            tier.pin(block_hash)
            pinned.append((block_hash, tier))
        self._jobs[job_id] = (time.monotonic(), pinned)
        return job_id

    def start(self, job_id: int, device_blocks: Iterable[int]) -> None:
        """Bring a reserved job's blocks into these device blocks (one per hash, in order)."""
        host: list[tuple[int, int, bytes]] = []
        disk: list[tuple[bytes, int]] = []
        _, pinned = self._jobs[job_id]
        for (block_hash, tier), device_block in zip(pinned, device_blocks, strict=True):
            tier.counts.blocks_out += 1
            if tier is self.host:
                host.append((self.host.entries[block_hash], device_block, block_hash))
            else:
                disk.append((block_hash, device_block))
        self._loads.append(BlockLoad(job_id, tuple(host), tuple(disk)))

    def cancel(self, job_id: int) -> None:
        """A reserved job that will not start (no device blocks for it)."""
        _, pinned = self._jobs.pop(job_id)
        for block_hash, tier in pinned:
            tier.unpin(block_hash)

    def loaded(self, job_id: int, failed: Iterable[bytes] = ()) -> None:
        """A load job finished; `failed` entries (a missing or corrupt file) are forgotten."""
        started, pinned = self._jobs.pop(job_id)
        self.load_seconds_sum += time.monotonic() - started
        self.load_count += 1
        for block_hash, tier in pinned:
            tier.unpin(block_hash)
        self.forget(failed)

    def forget(self, hashes: Iterable[bytes]) -> None:
        """Entries the storage could not keep (a failed read or write): gone from every tier,
        and the file dropped (with several ranks, the others' shards of it are still there)."""
        for block_hash in hashes:
            for tier in (self.host, self.disk):
                if block_hash in tier.entries and block_hash not in tier.pins:
                    tier.remove(block_hash)
                    if tier is self.disk:
                        self._disk_drops.append(block_hash)

    def restore(self, disk_hashes: Iterable[bytes], partial: Iterable[bytes] = ()) -> None:
        """Blocks a previous run left on disk (oldest first); beyond the budget, oldest dropped.
        `partial` blocks (files on some ranks only) are dropped from every rank."""
        if self.disk.capacity:
            self._disk_drops.extend(h for h in partial if h not in self.disk.entries)
        for block_hash in disk_hashes:
            if block_hash in self.disk.entries or not self.disk.capacity:
                continue
            self._make_disk_room()
            self.disk.add(block_hash)

    def flush(self, device_blocks: Iterable[tuple[int, bytes]]) -> None:
        """Before a shutdown: put what only the host tier or the device pool holds on disk, so a
        restart finds it. `device_blocks` are the pool's cached (block, hash), oldest first;
        where the budget runs out, the oldest give way."""
        if not self.disk.capacity:
            return
        for block_hash, slot in list(self.host.entries.items()):
            if block_hash not in self.disk.entries and self._make_disk_room():
                self.disk.add(block_hash)
                self._host_to_disk.append((slot, block_hash))
        for device_block, block_hash in device_blocks:
            if block_hash in self.host.entries or block_hash in self.disk.entries:
                continue
            if self._make_disk_room():
                self.disk.add(block_hash)
                self._device_to_disk.append((device_block, block_hash))

    # ---- to the worker -----------------------------------------------------------------------
    def take_ops(self) -> TierOps | None:
        """This step's moves; an empty TierOps while loads are in flight (the worker reports
        them done), None when there is nothing to do."""
        written = {h for _, h in self._host_to_disk} | {h for _, h in self._device_to_disk}
        ops = TierOps(
            host_to_disk=tuple(self._host_to_disk),
            # a file dropped and written again in one step: the write replaces it (and the drop,
            # done after host_to_disk, would remove the new one)
            disk_drops=tuple(h for h in self._disk_drops if h not in written),
            device_to_host=tuple(self._device_to_host),
            device_to_disk=tuple(self._device_to_disk),
            loads=tuple(self._loads),
        )
        self._host_to_disk, self._disk_drops, self._loads = [], [], []
        self._device_to_host, self._device_to_disk = [], []
        if ops.is_empty and not self._jobs:
            return None
        return ops

    def stats(self) -> tuple[TierStats, ...]:
        out = []
        for tier in (self.host, self.disk):
            if not tier.capacity:
                continue
            c = tier.counts
            out.append(TierStats(
                name=tier.name, num_blocks=tier.capacity, num_used_blocks=len(tier.entries),
                hits=c.hits, misses=c.misses, blocks_in=c.blocks_in, blocks_out=c.blocks_out,
                blocks_evicted=c.evicted, bytes_per_block=self.bytes_per_block,
                load_seconds_sum=self.load_seconds_sum, load_count=self.load_count,
            ))  # fmt: skip
        return tuple(out)
