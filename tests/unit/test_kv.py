"""BlockPool and KVCacheManager: exact block ids, reference counts, prefix reuse, eviction, CoW."""

import pytest

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager


def test_pool_allocates_in_order_and_frees_to_tail():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.num_free_blocks == 2 and pool.num_used_blocks == 2
    pool.free([1, 0])
    assert pool.num_used_blocks == 0
    # 2, 3 were never used, then 1, 0 in the order freed
    assert pool.allocate(4) == [2, 3, 1, 0]


def test_pool_double_free_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])


def test_pool_refuses_more_than_free():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_cached_block_is_evicted_lru_when_reallocated():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.free([a])
    pool.free([b])
    assert pool.lookup(b"ha") == a
    (c,) = pool.allocate(1)  # least recently freed: a
    assert c == a
    assert pool.lookup(b"ha") is None and pool.lookup(b"hb") == b


def test_manager_allocates_ceil_blocks_and_frees_everything():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    toks = list(range(10))
    assert kv.allocate_slots("r", toks, 0, 10)
    assert len(kv.block_tables["r"]) == 3
    assert kv.allocate_slots("r", toks + [10, 11], 10, 2)  # fills block 3 exactly
    assert len(kv.block_tables["r"]) == 3
    assert kv.allocate_slots("r", toks + [10, 11, 12], 12, 1)
    assert len(kv.block_tables["r"]) == 4
    kv.free("r")
    assert kv.pool.num_used_blocks == 0


def test_manager_fails_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert not kv.allocate_slots("r", list(range(9)), 0, 9)
    assert "r" not in kv.block_tables and kv.pool.num_free_blocks == 2


def test_prefix_hits_share_full_blocks_and_leave_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 112))  # 3 full blocks
    assert kv.get_computed_blocks("a", prompt) == ([], 0)
    assert kv.allocate_slots("a", prompt, 0, 12)
    blocks, n = kv.get_computed_blocks("b", prompt)
    # all 12 tokens are cached, but the last must be computed: only 2 blocks reused
    assert n == 8 and blocks == kv.block_tables["a"][:2]
    assert kv.allocate_slots("b", prompt, 8, 4, blocks)
    assert kv.pool.blocks[blocks[0]].ref_cnt == 2
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_used_blocks == 0
    # after both finished, the cached prefix is still findable (free but cached)
    blocks2, n2 = kv.get_computed_blocks("c", prompt + [1])
    assert n2 == 12 and blocks2 == blocks + [kv.pool.cached[kv._hashes["c"][2]]]
    assert kv.pool.hit_rate > 0


def test_prefix_hash_depends_on_everything_before():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    assert kv.allocate_slots("a", [1, 2, 3, 4, 5], 0, 5)
    # same second block [3, 4], different first block: no hit at all
    assert kv.get_computed_blocks("b", [9, 9, 3, 4, 5]) == ([], 0)


def test_hits_in_free_queue_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    assert kv.allocate_slots("a", [1, 2, 3, 4, 5], 0, 5)
    kv.free("a")  # 3 blocks free, two of them cached
    hits, n = kv.get_computed_blocks("b", [1, 2, 3, 4, 9, 9, 9])
    assert n == 4
    # needs 4 blocks for 7 tokens: 2 hits + 2 new, but only 1 block is free besides the hits
    assert not kv.allocate_slots("b", [1, 2, 3, 4, 9, 9, 9], 4, 3, hits)
    assert kv.pool.num_free_blocks == 3


def test_fork_shares_blocks_and_copy_on_write_on_partial_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(6))  # 1 full + 1 partial block
    assert kv.allocate_slots("p", prompt, 0, 6)
    kv.fork("p", "c", 6)
    full, partial = kv.block_tables["p"]
    assert kv.block_tables["c"] == [full, partial]
    assert kv.pool.blocks[partial].ref_cnt == 2
    # the child recomputes token 5 (in the shared partial block): it gets a private copy
    assert kv.allocate_slots("c", prompt, 5, 1)
    assert kv.take_copies() == [(partial, kv.block_tables["c"][1])]
    assert kv.block_tables["c"][0] == full and kv.block_tables["c"][1] != partial
    assert kv.pool.blocks[partial].ref_cnt == 1
    # the parent writes token 6 in place now: no further copy
    assert kv.allocate_slots("p", prompt + [7], 6, 1)
    assert kv.take_copies() == []
    for r in ("p", "c"):
        kv.free(r)
    assert kv.pool.num_used_blocks == 0
