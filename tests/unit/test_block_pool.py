"""BlockPool and LRU policy: exact block ids, eviction order, double-free detection."""

from __future__ import annotations

import pytest

from kvserve.kv.block_pool import Block, BlockPool, NoFreeBlocksError
from kvserve.kv.eviction import LRUPolicy, make_policy
from kvserve.kv.hashing import BlockHash, hash_block, hash_block_chain


def H(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


def test_allocate_low_ids_first_and_free_returns_them():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    pool.check_invariants()


def test_allocate_too_many_takes_nothing():
    pool = BlockPool(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([b])


def test_cached_block_survives_free_and_is_revived_by_hit():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    assert pool.cache_block(b, H(1), (1, 2))
    pool.free([b])
    assert pool.num_free_blocks == 3  # evictable counts as free
    hit = pool.lookup(H(1), (1, 2))
    assert hit is b
    pool.touch([hit])
    assert b.ref_count == 1 and pool.num_free_blocks == 2
    pool.check_invariants()


def test_lookup_compares_tokens_so_a_collision_is_a_miss():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, H(1), (1, 2))
    assert pool.lookup(H(1), (9, 9)) is None


def test_empty_blocks_are_used_before_evicting_cached_ones_and_lru_order():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    for i, blk in enumerate((a, b, c)):
        pool.cache_block(blk, H(i), (i,))
    pool.free([b, a, c])  # b freed first -> evicted first
    pool.free([d])  # d is empty: handed out before any eviction
    assert pool.allocate(1) == [d] and pool.num_evictions == 0
    assert pool.allocate(1) == [b] and pool.num_evictions == 1
    assert pool.lookup(H(1), (1,)) is None and b.block_hash is None
    assert pool.allocate(1) == [a]
    pool.check_invariants()


def test_referenced_block_is_never_evicted():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, H(1), (1,))
    pool.free([b])
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    assert pool.lookup(H(1), (1,)) is a


def test_same_content_cached_once():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, H(1), (1,))
    assert not pool.cache_block(b, H(1), (1,))
    pool.free([a, b])
    pool.check_invariants()
    assert pool.num_cached_blocks == 1


def test_reset_prefix_cache_drops_only_free_cached_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, H(1), (1,))
    pool.cache_block(b, H(2), (2,))
    pool.free([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(H(1), (1,)) is None and pool.lookup(H(2), (2,)) is b
    pool.check_invariants()


def test_lru_policy_remove_middle_and_pop_order():
    pool = BlockPool(4)
    blocks = pool.blocks
    lru = LRUPolicy()
    for b in blocks:
        lru.add(b)
    lru.remove(blocks[1])
    assert [b.block_id for b in lru] == [0, 2, 3]
    assert lru.pop() is blocks[0] and lru.pop() is blocks[2] and len(lru) == 1
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("nope")


def test_hash_chain_commits_to_prefix_and_extra_keys():
    tokens = list(range(40))
    chain = hash_block_chain(tokens, 16)
    assert len(chain) == 2
    assert chain[1] == hash_block(chain[0], tokens[16:32])
    other = hash_block_chain([99] + tokens[1:], 16)
    assert other[0] != chain[0] and other[1] != chain[1]  # a change in block 0 changes every later hash
    salted = hash_block_chain(tokens, 16, extra_keys=("tenant-a",))
    assert salted[0] != chain[0] and salted[1] != chain[1]
    # resuming the chain gives the same hashes as computing it in one go
    assert hash_block_chain(tokens, 16, parent=chain[0], start_block=1) == chain[1:]


# ------------------------------------------------------------------------------------ policies and leaves
def _cache_chain(pool: BlockPool, first_hash: int, length: int, depth0: int = 0, parent: BlockHash | None = None):
    """Allocate and cache a chain of `length` blocks with hashes H(first_hash), H(first_hash + 1), ..."""
    blocks = pool.allocate(length)
    for i, b in enumerate(blocks):
        pool.cache_block(b, H(first_hash + i), (first_hash + i,), parent, depth0 + i)
        parent = H(first_hash + i)
    return blocks


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost-aware"])
def test_leaves_go_before_their_parents_whatever_the_free_order(policy):
    pool = BlockPool(3, policy=make_policy(policy))
    b0, b1, b2 = _cache_chain(pool, 10, 3)
    pool.free([b0])  # the root becomes free first: plain LRU would evict it first and orphan b1, b2
    pool.free([b1])
    pool.free([b2])
    evicted = []
    pool.on_evict = lambda b: evicted.append(b.block_id)
    pool.allocate(3)
    assert evicted == [b2.block_id, b1.block_id, b0.block_id]
    pool.check_invariants()


def test_parent_is_evicted_only_when_no_leaf_is_left():
    pool = BlockPool(3)
    b0, b1 = _cache_chain(pool, 10, 2)
    pool.free([b0])  # b1 (its child) stays referenced
    evicted = []
    pool.on_evict = lambda b: evicted.append(b.block_id)
    (new,) = pool.allocate(1)  # the empty block goes first
    assert evicted == [] and new.block_id == 2
    pool.allocate(1)  # no evictable leaf: the parent must go
    assert evicted == [b0.block_id]
    assert pool.lookup(H(11), (11,)) is b1  # the orphan is still indexed and reconnects when H(10) returns
    pool.check_invariants()


def test_lfu_keeps_hot_blocks_through_a_scan_that_flushes_lru():
    def run(policy):
        pool = BlockPool(4, policy=make_policy(policy))
        (hot,) = _cache_chain(pool, 1, 1)
        pool.free([hot])
        for _ in range(3):  # the shared system prompt is hit again and again
            pool.touch([hot])
            pool.free([hot])
        for k in range(6):  # a scan of one-off blocks
            (b,) = _cache_chain(pool, 100 + k, 1)
            pool.free([b])
        pool.check_invariants()
        return pool.lookup(H(1), (1,)) is not None

    assert run("lfu") and run("cost-aware")
    assert not run("lru")


def test_lfu_ages_out_blocks_that_were_hot_long_ago():
    pool = BlockPool(2, policy=make_policy("lfu"))
    (old,) = _cache_chain(pool, 1, 1)
    pool.free([old])
    for _ in range(3):
        pool.touch([old])
        pool.free([old])
    # Without aging, `old` (4 hits) would outlive any number of 1-hit blocks; with it, the inflation L
    # grows with each victim until the newcomers' L + 1 passes old's 4.
    for k in range(8):
        (b,) = _cache_chain(pool, 100 + k, 1)
        pool.free([b])
    assert pool.lookup(H(1), (1,)) is None
    pool.check_invariants()


def test_cost_aware_evicts_never_reused_blocks_first():
    pool = BlockPool(3, policy=make_policy("cost-aware"))
    (reused,) = _cache_chain(pool, 1, 1)
    pool.free([reused])
    pool.touch([reused])
    pool.free([reused])
    (one_off,) = _cache_chain(pool, 2, 1)  # freed later, so LRU would evict `reused` first
    pool.free([one_off])
    evicted = []
    pool.on_evict = lambda b: evicted.append(b.block_id)
    pool.allocate(2)
    assert evicted == [one_off.block_id]


def test_cost_aware_evicts_cheap_shallow_leaves_before_deep_ones():
    from kvserve.kv.eviction import recompute_cost

    pool = BlockPool(8, policy=make_policy("cost-aware", cost=recompute_cost(0.05, 16)))
    deep = _cache_chain(pool, 10, 6)  # a long prefix: its leaf sits at depth 5
    pool.free(reversed(deep))
    (shallow,) = _cache_chain(pool, 50, 1)
    pool.free([shallow])
    for blocks in (deep, [shallow]):  # each reused once; the shallow one last, so LRU would keep it
        pool.touch(blocks)
        pool.free(reversed(blocks))
    evicted = []
    pool.on_evict = lambda b: evicted.append(b.block_id)
    pool.allocate(2)  # one empty block, then one victim
    assert evicted == [shallow.block_id]
    pool.check_invariants()


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo")


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost-aware"])
def test_a_readded_block_keeps_its_tie_break(policy):
    """Equal priorities go to the block that became evictable first; a block popped and handed back through
    `readd` is still older than one of equal priority added after it."""
    policy_ = make_policy(policy)
    first, second = Block(0, hits=2, depth=1), Block(1, hits=2, depth=1)
    policy_.add(first)
    policy_.add(second)
    assert policy_.pop() is first
    policy_.readd(first)
    assert [policy_.pop(), policy_.pop()] == [first, second]


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost-aware"])
def test_a_chain_keeps_its_rank_while_its_leaves_are_evicted(policy):
    """Regression: a parent the pool set aside (the policy offered it while a cached child still chained from
    it) must come back through `readd` at the rank it had, not behind blocks freed after it: a dead scan would
    otherwise outlive a hot system prompt, one block at a time.

    The scan is freed root first, so the policy offers its root and middle block before their leaf: both are
    set aside and return through `readd` as the blocks below them go. Each scan block was used twice, the hot
    block three times and last: re-ranking a returning block as if newly added (LRU: behind `hot`; LFU and
    cost-aware: its value on top of the aged L) would evict `hot` before the rest of the scan."""
    policy_ = make_policy(policy)
    readded = []
    readd = policy_.readd
    policy_.readd = lambda block: (readded.append(block.block_id), readd(block))
    pool = BlockPool(5, policy=policy_)
    scan = _cache_chain(pool, 10, 3)
    pool.free(scan)
    pool.touch(scan)
    pool.free(scan)
    (hot,) = _cache_chain(pool, 50, 1)  # freed after the whole scan, and used more often
    for _ in range(2):
        pool.free([hot])
        pool.touch([hot])
    pool.free([hot])
    evicted = []
    pool.on_evict = lambda b: evicted.append(b.block_id)
    pool.allocate(4)  # one empty block, then three victims: the scan, leaf upwards
    assert readded == [scan[1].block_id, scan[0].block_id]  # the path under test was taken
    assert evicted == [scan[2].block_id, scan[1].block_id, scan[0].block_id]
    assert pool.lookup(H(50), (50,)) is hot
    pool.check_invariants()
