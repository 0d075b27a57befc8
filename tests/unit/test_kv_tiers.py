"""The KV tier policy and the manager's loading path, pure Python: exact slots and ops, S3-FIFO
order, byte budgets, pins against concurrent eviction, same-step hazards, and no block leaked."""

from __future__ import annotations

import pytest

from tokenmill.kv.manager import KVCacheManager, hash_block
from tokenmill.kv.moves import BlockLoad, TierInfo, TierOps
from tokenmill.kv.tiers import TierPolicy

H = [bytes([i]) * 16 for i in range(32)]  # block hashes


def test_offload_fills_host_slots_then_demotes_by_s3_fifo_to_disk():
    t = TierPolicy(host_blocks=2, disk_blocks=2, bytes_per_block=100)
    t.offload(7, H[0])
    t.offload(8, H[1])
    assert t.take_ops() == TierOps(device_to_host=((7, 0), (8, 1)))
    t.offload(9, H[2])  # host full: H[0] (oldest, never used again) goes down from its slot
    assert t.take_ops() == TierOps(host_to_disk=((0, H[0]),), device_to_host=((9, 0),))
    assert list(t.host.entries) == [H[1], H[2]] and list(t.disk.entries) == [H[0]]
    t.offload(3, H[1])  # already on host: no copy, but a use
    assert t.take_ops() is None
    t.offload(4, H[3])  # H[1], used, moves on to main; H[2] (unused) leaves
    assert t.take_ops() == TierOps(host_to_disk=((0, H[2]),), device_to_host=((4, 0),))
    assert list(t.host.main) == [H[1]] and list(t.host.small) == [H[3]]
    t.offload(5, H[4])  # H[3] down, not H[1]; disk full of H[0], H[2]: H[0] dropped
    assert t.take_ops() == TierOps(
        host_to_disk=((0, H[3]),), disk_drops=(H[0],), device_to_host=((5, 0),)
    )
    assert list(t.disk.entries) == [H[2], H[3]] and set(t.host.entries) == {H[1], H[4]}
    (host, disk) = t.stats()
    assert (host.blocks_in, host.blocks_evicted, host.num_used_blocks) == (5, 3, 2)
    assert (disk.blocks_in, disk.blocks_evicted, disk.num_used_blocks) == (3, 1, 2)
    # the ghost remembers the last `capacity` hashes evicted unused (H[0] fell out: H[2], H[3])
    assert list(t.host.ghost) == [H[2], H[3]]
    t.offload(6, H[3])  # evicted unused a moment ago: back, it goes straight to main
    assert t.take_ops() == TierOps(
        host_to_disk=((0, H[4]),), disk_drops=(H[2],), device_to_host=((6, 0),)
    )
    assert list(t.host.main) == [H[1], H[3]] and not t.host.small


def test_main_is_a_clock_with_capped_uses_and_a_scan_passes_through_small():
    """Blocks used twice reach main; there the CLOCK spares an entry once per use since the hand
    passed (at most 3 kept). A scan of blocks used once then only churns `small`: main keeps
    its blocks, where LRU would have lost all of them."""
    t = TierPolicy(host_blocks=10, disk_blocks=0, bytes_per_block=100)
    for i in range(10):
        t.offload(i, H[i])
        t.offload(i, H[i])  # a second eviction from the pool: a use
    for _ in range(5):
        t.offload(0, H[0])
    assert t.host.uses[H[0]] == 3 and all(t.host.uses[h] == 1 for h in H[1:10])
    t.offload(10, H[10])  # small is over its share: its used entries all move on to main, where
    # the hand takes one use from each, passes H[0] again (uses left) and takes H[1]
    assert H[1] not in t.host.entries and list(t.host.small) == [H[10]]
    assert list(t.host.main) == H[2:10] + [H[0]] and t.host.uses[H[0]] == 1
    for i in range(11, 20):
        t.offload(i, H[i])  # each new block, unused, pushes out the one before it
    assert set(t.host.main) == {H[0], *H[2:10]} and list(t.host.small) == [H[19]]
    assert list(t.host.ghost) == H[10:19]


def test_conversations_taking_turns_keep_hits_where_lru_has_none():
    """Twelve chains of one block each take turns through a tier of eight: LRU drops each just
    before it returns (no hit, ever); S3-FIFO keeps a third or more (the optimum, Belady, would
    keep about 7/11)."""
    requests = [H[i] for _ in range(6) for i in range(12)]
    hits = {}
    for policy in ("s3fifo", "lru"):
        t = TierPolicy(host_blocks=8, disk_blocks=0, bytes_per_block=100, policy=policy)
        hits[policy] = 0
        for i, block_hash in enumerate(requests):
            if t.find(block_hash):
                hits[policy] += 1
                t.loaded(t.reserve([block_hash]))
            t.offload(i, block_hash)  # answered and pushed out of the pool again
    assert hits["lru"] == 0
    assert hits["s3fifo"] >= 20, hits  # of 60 returns


def test_the_lru_policy_demotes_the_least_recently_used_block():
    """kv_tier_policy lru (the tier's policy before S3-FIFO): a use makes an entry the most
    recent; the least recent leaves."""
    t = TierPolicy(host_blocks=2, disk_blocks=2, bytes_per_block=100, policy="lru")
    t.offload(7, H[0])
    t.offload(8, H[1])
    assert t.take_ops() == TierOps(device_to_host=((7, 0), (8, 1)))
    t.offload(9, H[2])  # host full: H[0] (least recent) goes down to disk from its slot
    assert t.take_ops() == TierOps(host_to_disk=((0, H[0]),), device_to_host=((9, 0),))
    assert list(t.host.main) == [H[1], H[2]] and list(t.disk.main) == [H[0]]
    t.offload(3, H[1])  # already on host: no copy, but it becomes the most recent
    assert t.take_ops() is None
    t.offload(4, H[3])  # so H[2] is the victim now
    assert t.take_ops() == TierOps(host_to_disk=((0, H[2]),), device_to_host=((4, 0),))
    t.offload(5, H[4])  # H[1] down; disk full of H[0], H[2]: H[0] dropped
    assert t.take_ops() == TierOps(
        host_to_disk=((1, H[1]),), disk_drops=(H[0],), device_to_host=((5, 1),)
    )
    assert list(t.disk.main) == [H[2], H[1]] and not t.host.small and not t.host.ghost
    with pytest.raises(ValueError, match="kv_tier_policy must be one of"):
        TierPolicy(1, 0, 100, policy="arc")


def test_without_a_host_tier_blocks_go_straight_to_disk():
    t = TierPolicy(host_blocks=0, disk_blocks=1, bytes_per_block=100)
    t.offload(3, H[0])
    t.offload(4, H[1])  # the one disk slot: H[0]'s write not done yet is cancelled, not dropped
    assert t.take_ops() == TierOps(device_to_disk=((4, H[1]),))
    assert [s.name for s in t.stats()] == ["disk"]


def test_a_block_demoted_in_the_step_it_arrived_goes_to_disk_from_its_device_block():
    t = TierPolicy(host_blocks=1, disk_blocks=4, bytes_per_block=100)
    t.offload(5, H[0])
    t.offload(6, H[1])  # slot 0 refilled before the worker copied H[0] into it
    assert t.take_ops() == TierOps(device_to_host=((6, 0),), device_to_disk=((5, H[0]),))


def test_pinned_blocks_are_never_evicted_and_a_full_pinned_tier_loses_the_block():
    t = TierPolicy(host_blocks=2, disk_blocks=0, bytes_per_block=100)
    t.offload(1, H[0])
    t.offload(2, H[1])
    t.take_ops()
    assert t.find(H[0]) and t.find(H[1])
    job = t.reserve([H[0], H[1]])
    t.offload(3, H[2])  # every slot is being read by a load: nowhere to go
    assert t.num_lost == 1 and H[2] not in t.host.entries
    t.start(job, [10, 11])
    ops = t.take_ops()
    assert ops.loads == (BlockLoad(job, ((0, 10, H[0]), (1, 11, H[1])), ()),)
    assert t.take_ops() == TierOps()  # in flight: an empty TierOps asks the worker to report
    t.loaded(job)
    assert t.take_ops() is None and not t.host.pins
    t.offload(4, H[2])  # now one of them makes room
    assert len(t.host.entries) == 2 and H[2] in t.host.entries


def test_a_cancelled_reservation_unpins_and_a_failed_load_forgets_the_block():
    t = TierPolicy(host_blocks=0, disk_blocks=2, bytes_per_block=100)
    t.restore([H[0], H[1], H[2]])  # budget 2: the oldest left behind
    assert list(t.disk.entries) == [H[1], H[2]]
    t.cancel(t.reserve([H[1]]))
    assert not t.disk.pins
    job = t.reserve([H[1], H[2]])
    t.start(job, [4, 5])
    ops = t.take_ops()
    assert ops.loads == (BlockLoad(job, (), ((H[1], 4), (H[2], 5))),)
    assert ops.disk_drops == (H[0],)  # the restore's oldest, beyond the budget
    t.loaded(job, failed=[H[2]])
    assert list(t.disk.entries) == [H[1]]
    assert t.stats()[0].load_count == 1
    # the failed block's file goes on every rank (with several ranks, the others have theirs)
    assert t.take_ops() == TierOps(disk_drops=(H[2],))


def test_several_ranks_tiers_merge_and_partial_blocks_are_dropped_everywhere():
    """Each rank holds its shard of every block: the smallest rank sets the slots, a block's
    bytes are all ranks' together, and only blocks every rank's disk holds come back."""
    ranks = [
        TierInfo(10, 100, 5, (H[0], H[1], H[2], H[3])),
        TierInfo(12, 100, 4, (H[3], H[1], H[0], H[4])),  # H[2] lost here, H[4] only here
    ]
    info = TierInfo.merge(ranks)
    assert info == TierInfo(10, 200, 4, (H[0], H[1], H[3]), tuple(sorted([H[2], H[4]])))
    assert TierInfo.merge(ranks[:1]) == ranks[0]
    t = TierPolicy(info.host_blocks, info.disk_blocks, info.bytes_per_block)
    t.restore(info.disk_hashes, info.disk_partial)
    assert list(t.disk.entries) == [H[0], H[1], H[3]]
    assert set(t.take_ops().disk_drops) == {H[2], H[4]}


def test_a_file_dropped_and_rewritten_in_one_step_is_not_dropped_after_the_write():
    """host_to_disk runs before disk_drops: the drop of a block written again in the same step
    would delete the new file."""
    t = TierPolicy(host_blocks=2, disk_blocks=2, bytes_per_block=100)
    t.restore([H[0], H[5]])  # an earlier run's files
    t.offload(1, H[6])
    t.offload(2, H[0])  # back in the pool from its file, evicted again: on host and disk
    t.take_ops()
    t.offload(3, H[1])  # host evicts H[6]: down to disk, whose oldest (H[0]) is dropped...
    t.offload(4, H[2])  # ...then host evicts H[0]: down to disk again (H[5] dropped for it)
    ops = t.take_ops()
    assert ops.host_to_disk == ((0, H[6]), (1, H[0])) and ops.disk_drops == (H[5],)
    assert list(t.disk.entries) == [H[6], H[0]]


def test_find_counts_hits_and_misses_per_tier():
    t = TierPolicy(host_blocks=1, disk_blocks=1, bytes_per_block=100)
    t.offload(1, H[0])
    t.offload(2, H[1])  # H[0] to disk
    assert t.find(H[1]) and t.find(H[0]) and not t.find(H[5])
    host, disk = t.stats()
    assert (host.hits, host.misses, disk.hits, disk.misses) == (1, 2, 1, 1)


# ---- the manager: prefixes below the device --------------------------------------------------
BS = 4


def fill(kv: KVCacheManager, req: str, tokens: list[int]) -> None:
    assert kv.allocate_slots(req, tokens, 0, len(tokens))
    kv.free(req)


def evict_all(kv: KVCacheManager) -> None:
    """Take every block once (evicting every cached one), then give them back."""
    n = kv.pool.num_free_blocks
    kv.allocate_slots("hog", list(range(1000, 1000 + n * BS)), 0, n * BS)
    kv.free("hog")
    kv.pool.cached.clear()  # the hog's own blocks are not the point
    for b in kv.pool.blocks:
        b.block_hash = None


def manager(host_blocks=16, disk_blocks=0, num_blocks=8):
    tiers = TierPolicy(host_blocks, disk_blocks, bytes_per_block=64)
    return KVCacheManager(num_blocks, BS, True, tiers), tiers


def test_a_prefix_evicted_to_host_is_loaded_back_into_fresh_blocks():
    kv, tiers = manager()
    prompt = list(range(13))  # 3 full blocks + 1 token
    fill(kv, "a", prompt)
    evict_all(kv)
    ops = tiers.take_ops()
    assert len(ops.device_to_host) == 3
    table, num_tokens, loading = kv.find_prefix("b", prompt)
    assert loading and num_tokens == 0 and len(table) == 3
    (load,) = tiers.take_ops().loads
    assert [d for _, d, _ in load.host] == table
    assert kv.num_loads_in_flight == 1
    assert kv.finish_loads([load.job_id]) == [("b", 12)]
    hashes = [hash_block(b"", prompt[:4])]
    assert kv.pool.cached[hashes[0]] == table[0]  # registered for others once in
    assert kv.allocate_slots("b", prompt, 12, 1)
    kv.free("b")
    assert kv.pool.num_used_blocks == 0 and not tiers.host.pins


def test_a_second_request_shares_blocks_that_are_still_loading():
    kv, tiers = manager()
    prompt = list(range(9))
    fill(kv, "a", prompt)
    evict_all(kv)
    tiers.take_ops()
    t1, _, loading1 = kv.find_prefix("b", prompt)
    t2, _, loading2 = kv.find_prefix("c", prompt + [99])
    assert loading1 and loading2 and t1 == t2
    (load,) = tiers.take_ops().loads  # one job: c waits on b's
    assert sorted(kv.finish_loads([load.job_id])) == [("b", 8), ("c", 8)]
    kv.free("b")
    kv.free("c")
    assert kv.pool.num_used_blocks == 0


def test_an_abort_while_loading_frees_the_blocks_only_when_the_load_is_done():
    kv, tiers = manager()
    prompt = list(range(9))
    fill(kv, "a", prompt)
    evict_all(kv)
    tiers.take_ops()
    table, _, _ = kv.find_prefix("b", prompt)
    (load,) = tiers.take_ops().loads
    kv.free("b")  # aborted
    assert all(not kv.pool.is_free(b) for b in table)  # the job still writes them
    assert kv.finish_loads([load.job_id]) == []
    assert kv.pool.num_used_blocks == 0
    assert kv.find_prefix("c", prompt)[1] == 8  # what it loaded is a device hit now


def test_a_failed_block_cuts_the_prefix_there():
    kv, tiers = manager(host_blocks=0, disk_blocks=16)
    prompt = list(range(13))
    fill(kv, "a", prompt)
    evict_all(kv)
    tiers.take_ops()
    table, _, _ = kv.find_prefix("b", prompt)
    (load,) = tiers.take_ops().loads
    bad = load.disk[1][0]
    assert kv.finish_loads([load.job_id], failed=[bad]) == [("b", 4)]
    assert kv.block_tables["b"] == table[:1]
    assert bad not in tiers.disk.entries
    kv.free("b")
    assert kv.pool.num_used_blocks == 0


def test_no_room_to_load_falls_back_to_computing():
    kv, tiers = manager(num_blocks=4)
    prompt = list(range(13))
    fill(kv, "a", prompt)
    evict_all(kv)
    tiers.take_ops()
    assert kv.allocate_slots("busy", list(range(500, 508)), 0, 8)  # 2 of 4 blocks taken
    assert kv.find_prefix("b", prompt) == ([], 0, False)
    assert not tiers.host.pins and kv.num_loads_in_flight == 0


@pytest.mark.parametrize("host_blocks", [0, 3])
def test_tiers_need_prefix_caching(host_blocks):
    tiers = TierPolicy(host_blocks, 0, 64)
    kv = KVCacheManager(4, BS, enable_prefix_caching=False, tiers=tiers)
    assert kv.tiers is None and kv.take_tier_ops() is None
