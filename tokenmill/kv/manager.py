"""KVCacheManager: per-request block tables on top of the BlockPool.

It hands out the blocks a request needs for the tokens it is about to compute, finds the
longest cached prefix of a new prompt, forks a sequence for n > 1 sampling (sharing every block),
and makes a private copy of a shared block before anyone writes into it (copy-on-write). The
copies it decides on are collected for the runner, which moves the K/V data.
With KV tiers (kv/tiers.py), a prefix that continues below the device is brought back: the
request gets fresh blocks that a load job fills (`find_prefix` says it is loading), and becomes
schedulable when `finish_loads` reports every block in. A load job holds its own reference on
the blocks it writes, so an abort meanwhile never hands them to another request mid-write.
Pure Python; no torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.moves import TierOps
from tokenmill.kv.tiers import TierPolicy


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained hash: a block's identity is its tokens and everything before them."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class _Wait:
    """A request whose prefix is loading: the table positions that come from tiers."""

    loads: list[tuple[int, bytes]]  # (table index, hash) of the blocks being loaded
    pending: set[bytes] = field(default_factory=set)  # of those, still in flight
    failed: set[bytes] = field(default_factory=set)  # of those, not readable


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        tiers: TierPolicy | None = None,
        num_state_slots: int = 0,
    ):
        """`num_state_slots`: slots of the state-space layers' state, one per request holding
        blocks (0: the model has no such layer)."""
        self.block_size = block_size
        self.num_state_slots = num_state_slots
        self._free_slots = list(range(num_state_slots - 1, -1, -1))  # pop() hands out 0 first
        self.state_slots: dict[str, int] = {}
        self._state_copies: list[tuple[int, int]] = []  # (src, dst) slots a fork copies
        self.enable_prefix_caching = enable_prefix_caching
        on = tiers is not None and tiers.is_enabled and enable_prefix_caching
        self.tiers = tiers if on else None
        offload = self.tiers.offload if self.tiers is not None else None
        self.pool = BlockPool(num_blocks, enable_prefix_caching, offload)
        self._loading: dict[bytes, int] = {}  # hash -> device block, while a job fills it
        self._jobs: dict[int, list[tuple[bytes, int]]] = {}  # job -> its (hash, device block)
        self._waits: dict[str, _Wait] = {}  # requests waiting for loads
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chained hashes of the request's full blocks
        self._num_cached: dict[str, int] = {}  # leading blocks already registered in the cache
        self._copies: list[tuple[int, int]] = []  # (src, dst) block copies the runner must do

    # ---- queries -------------------------------------------------------------------------
    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req_id: str, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached prefix of `token_ids`: (block ids, tokens covered).

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._block_hashes(req_id, token_ids, max_blocks * self.block_size)
        hits: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def find_prefix(self, req_id: str, token_ids: Sequence[int]) -> tuple[list[int], int, bool]:
        """As get_computed_blocks, then on down the tiers: (device blocks, tokens, is_loading).

        When the prefix continues in a lower tier (or in blocks another request is loading),
        and the free blocks can take it, the request gets its whole prefix as its block table
        now and waits (is_loading True, tokens 0) until `finish_loads` names it ready.
        """
        hits, num_cached = self.get_computed_blocks(req_id, token_ids)
        if self.tiers is None:
            return hits, num_cached, False
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._hashes[req_id][:max_blocks]
        chain: list[tuple[bytes, int | None]] = []  # (hash, device block or None: a new one)
        for block_hash in hashes[len(hits) :]:
            block_id = self.pool.cached.get(block_hash, self._loading.get(block_hash))
            if block_id is None and not self.tiers.find(block_hash):
                break
            chain.append((block_hash, block_id))
        if not any(b is None or h in self._loading for h, b in chain):
            return hits, num_cached, False
        reused = [b for _, b in chain if b is not None]
        wanted = sum(1 for _, b in chain if b is None)
        in_free_queue = sum(1 for b in [*hits, *reused] if self.pool.is_free(b))
        if wanted > self.pool.num_free_blocks - in_free_queue:
            return hits, num_cached, False  # no room to bring it back: computed as usual
        new_hashes = [h for h, b in chain if b is None]
        job_id = self.tiers.reserve(new_hashes) if new_hashes else None  # pinned before evicting
        for block_id in [*hits, *reused]:
            self.pool.share(block_id)
        fresh = iter(self.pool.allocate(wanted))
        table, wait, job = list(hits), _Wait([]), []
        for block_hash, block_id in chain:
            if block_id is None:
                block_id = next(fresh)
                self.pool.share(block_id)  # the job's own reference
                self._loading[block_hash] = block_id
                job.append((block_hash, block_id))
            if block_hash in self._loading:
                wait.loads.append((len(table), block_hash))
                wait.pending.add(block_hash)
            table.append(block_id)
        if job_id is not None:
            self.tiers.start(job_id, [b for _, b in job])
            self._jobs[job_id] = job
        self.block_tables[req_id] = table
        self._waits[req_id] = wait
        self._num_cached[req_id] = len(hits)
        return table, 0, True

    def finish_loads(
        self, job_ids: Iterable[int], failed: Iterable[bytes] = (), lost: Iterable[bytes] = ()
    ) -> list[tuple[str, int]]:
        """Load jobs done (`failed` blocks unreadable; `lost` ones a disk write dropped):
        returns the requests now ready, with the tokens their prefix covers."""
        failed = set(failed)
        if self.tiers is not None:
            self.tiers.forget(lost)
        done: set[bytes] = set()
        for job_id in job_ids:
            for block_hash, block_id in self._jobs.pop(job_id):
                del self._loading[block_hash]
                if block_hash not in failed:
                    self.pool.cache(block_id, block_hash)
                self.pool.free([block_id])
                done.add(block_hash)
            assert self.tiers is not None
            self.tiers.loaded(job_id, failed)
        ready = []
        for req_id, wait in list(self._waits.items()):
            wait.failed |= wait.pending & failed
            wait.pending -= done
            if not wait.pending:
                del self._waits[req_id]
                ready.append((req_id, self._adopt(req_id, wait)))
        return ready

    def _adopt(self, req_id: str, wait: _Wait) -> int:
        """A request's loads are in: its table up to the first unreadable block is its prefix."""
        table = self.block_tables[req_id]
        bad = [i for i, h in wait.loads if h in wait.failed]
        valid = bad[0] if bad else len(table)
        self.pool.free(table[valid:][::-1])
        del table[valid:]
        self._num_cached[req_id] = valid
        return valid * self.block_size

    @property
    def num_loads_in_flight(self) -> int:
        return len(self._jobs)

    def flush_tiers(self) -> TierOps | None:
        """The moves that leave every cached block on disk (a clean shutdown), if any."""
        if self.tiers is None or self._jobs:
            return None
        pool = self.pool
        cached = {b: h for h, b in pool.cached.items()}
        order = [b for b in pool.free_block_ids() if b in cached]  # LRU first, then in use
        order += [b for b in cached if not pool.is_free(b)]
        self.tiers.flush((b, cached[b]) for b in order)
        return self.tiers.take_ops()

    def take_tier_ops(self) -> TierOps | None:
        return self.tiers.take_ops() if self.tiers is not None else None

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(
        self,
        req_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        computed_blocks: Sequence[int] = (),
    ) -> bool:
        """Make room for tokens [num_computed_tokens, +num_new_tokens); False if blocks run out.

        `computed_blocks` (from get_computed_blocks) are prefix hits adopted by a new request.
        On False nothing changed.
        """
        if self.num_state_slots and req_id not in self.state_slots and not self._free_slots:
            return False  # every state slot is held by a request
        table = self.block_tables.setdefault(req_id, [])
        total_tokens = num_computed_tokens + num_new_tokens
        num_new_blocks = self.num_blocks_for(total_tokens) - len(table) - len(computed_blocks)
        write_block = num_computed_tokens // self.block_size
        needs_copy = write_block < len(table) and self.pool.is_shared(table[write_block])
        num_hits_in_free_queue = sum(1 for b in computed_blocks if self.pool.is_free(b))
        wanted = max(num_new_blocks, 0) + int(needs_copy)
        if wanted > self.pool.num_free_blocks - num_hits_in_free_queue:
            if not table:
                del self.block_tables[req_id]
            return False
        for block_id in computed_blocks:
            self.pool.share(block_id)
        table.extend(computed_blocks)
        if needs_copy:
            (private,) = self.pool.allocate(1)
            self._copies.append((table[write_block], private))
            self.pool.free([table[write_block]])
            table[write_block] = private
            self._num_cached[req_id] = min(self._num_cached.get(req_id, 0), write_block)
        if num_new_blocks > 0:
            table.extend(self.pool.allocate(num_new_blocks))
        if self.num_state_slots and req_id not in self.state_slots:
            self.state_slots[req_id] = self._free_slots.pop()
        self._cache_full_blocks(req_id, token_ids, total_tokens)
        return True

    def state_slot(self, req_id: str) -> int:
        """The request's state slot, -1 when the model keeps no state."""
        return self.state_slots.get(req_id, -1)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> bool:
        """Give `child_id` the parent's blocks for its first `num_tokens` tokens, shared, and
        a copy of its state (a state slot of its own); False, nothing done, if no slot is free."""
        if self.num_state_slots:
            if not self._free_slots:
                return False
            slot = self.state_slots[child_id] = self._free_slots.pop()
            self._state_copies.append((self.state_slots[parent_id], slot))
        blocks = self.block_tables[parent_id][: self.num_blocks_for(num_tokens)]
        for block_id in blocks:
            self.pool.share(block_id)
        self.block_tables[child_id] = list(blocks)
        full = num_tokens // self.block_size
        self._hashes[child_id] = self._hashes.get(parent_id, [])[:full]
        self._num_cached[child_id] = min(self._num_cached.get(parent_id, 0), full)
        return True

    def free(self, req_id: str) -> None:
        """Return a finished, aborted or preempted request's blocks, tail first."""
        table = self.block_tables.pop(req_id, [])
        self.pool.free(table[::-1])
        self._num_cached.pop(req_id, None)
        self._hashes.pop(req_id, None)
        self._waits.pop(req_id, None)  # its loads go on; the jobs free what they hold
        slot = self.state_slots.pop(req_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self._copies = self._copies, []
        return copies

    def take_state_copies(self) -> list[tuple[int, int]]:
        copies, self._state_copies = self._state_copies, []
        return copies

    # ---- prefix hashing ------------------------------------------------------------------
    def _block_hashes(self, req_id: str, token_ids: Sequence[int], num_tokens: int) -> list[bytes]:
        hashes = self._hashes.setdefault(req_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else b""
            hashes.append(hash_block(parent, token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _cache_full_blocks(self, req_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """Register blocks that this step fills completely, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_cached.get(req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req_id, token_ids, num_full * self.block_size)
        table = self.block_tables[req_id]
        for i in range(start, num_full):
            self.pool.cache(table[i], hashes[i])
        self._num_cached[req_id] = num_full
