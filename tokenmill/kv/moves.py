"""The KV tiers' values: the moves the policy (kv/tiers.py) sends the worker's storage
(kv/storage/) each step, what the storage holds at start, and the tiers' counts. Frozen plain
data like every contract in engine/messages.py, which re-exports them. Pure Python; no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockLoad:
    """One step's blocks brought back from the lower tiers into device blocks (a job)."""

    job_id: int  # reported back in RunnerOutput.loads_done once every block is in
    host: tuple[tuple[int, int, bytes], ...]  # (host slot, device block, block hash)
    disk: tuple[tuple[bytes, int], ...]  # (block hash, device block): read from its file


@dataclass(frozen=True)
class TierOps:
    """KV block moves for one step, decided by kv/tiers.py. The worker does them in field
    order, all before the step's block copies and forward (which may overwrite the device
    blocks offloaded here); loads then run in the background."""

    host_to_disk: tuple[tuple[int, bytes], ...] = ()  # (host slot, hash): written to its file
    disk_drops: tuple[bytes, ...] = ()  # files removed (the disk tier evicted them)
    device_to_host: tuple[tuple[int, int], ...] = ()  # (device block, host slot)
    device_to_disk: tuple[tuple[int, bytes], ...] = ()  # (device block, hash): no host tier
    loads: tuple[BlockLoad, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.host_to_disk or self.disk_drops or self.device_to_host
                    or self.device_to_disk or self.loads)  # fmt: skip


@dataclass(frozen=True)
class TierInfo:
    """What a worker's KV tier storage holds at start (executor -> core, once)."""

    host_blocks: int  # slots the host tier's bytes hold (0: no host tier)
    bytes_per_block: int  # one block in the tiers' format (kv_tier_dtype)
    disk_blocks: int  # blocks the disk tier's byte budget holds (0: no disk tier)
    disk_hashes: tuple[bytes, ...] = ()  # valid blocks an earlier run left, oldest first
    disk_partial: tuple[bytes, ...] = ()  # blocks some ranks' files hold and others' do not

    @staticmethod
    def merge(ranks: list[TierInfo]) -> TierInfo:
        """The tiers of several ranks (each holding its shard of every block) as one: as many
        slots as the smallest rank has, a block's bytes over all ranks, and the blocks an
        earlier run left on every rank's disk (in the first rank's order); a block left on only
        some ranks (a run cut short mid-write) is partial, to be dropped."""
        first = ranks[0]
        on_all = set(first.disk_hashes).intersection(*(r.disk_hashes for r in ranks[1:]))
        seen = {h for r in ranks for h in r.disk_hashes}
        return TierInfo(
            host_blocks=min(r.host_blocks for r in ranks),
            bytes_per_block=sum(r.bytes_per_block for r in ranks),
            disk_blocks=min(r.disk_blocks for r in ranks),
            disk_hashes=tuple(h for h in first.disk_hashes if h in on_all),
            disk_partial=tuple(sorted(seen - on_all)),
        )


@dataclass(frozen=True)
class TierStats:
    """One KV tier below the device pool, since start (kv/tiers.py)."""

    name: str  # "host" or "disk"
    num_blocks: int  # capacity
    num_used_blocks: int
    hits: int  # blocks found here on a device miss
    misses: int  # blocks asked of this tier and not found
    blocks_in: int  # blocks written into this tier
    blocks_out: int  # blocks loaded from it into the device pool
    blocks_evicted: int  # blocks it dropped or moved down
    bytes_per_block: int
    load_seconds_sum: float  # load jobs, from start to reported done (all tiers)
    load_count: int
