"""CheckpointStore against a brute-force model: an ordered dict in LRU order and a linear scan for lookups.

The state machine puts snapshots of several sizes under real hash chains (shared stems, a salted copy, and
now and then a key stored at the wrong depth), looks prefixes up at random depths, and after every step
checks that the bytes held never exceed the budget, that the store holds exactly the model's entries in the
model's LRU order, that every entry still holds the values it was stored with, and that the counters agree.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvserve.kv.hashing import hash_block_chain
from kvserve.recurrent.checkpoints import CheckpointStore

BS = 2
BUDGET = 200  # bytes: a handful of the float32 snapshots below
_STEMS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 7, 7, 7, 7, 7, 7], [9, 9, 9, 9, 9, 9]]
CHAINS = [hash_block_chain(s, BS) for s in _STEMS] + [hash_block_chain(_STEMS[0], BS, extra_keys=("salt",))]


def snapshot(value: float, elems: int) -> list[torch.Tensor]:
    """Two 'layers' (conv, ssm) filled with value: elems float32s in all."""
    return [torch.full((elems // 2,), value), torch.full((elems - elems // 2,), value + 0.5)]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.store = CheckpointStore(BUDGET)
        self.model: OrderedDict[bytes, tuple[int, int, float]] = OrderedDict()  # key -> (depth, bytes, value)
        self.stored = self.evicted = self.hits = self.misses = 0
        self.next_value = 1.0

    @rule(
        chain=st.integers(0, len(CHAINS) - 1),
        depth=st.integers(1, 5),
        elems=st.sampled_from([2, 6, 10, 20, 60]),
        wrong_depth=st.sampled_from([False, False, False, True]),
    )
    def put(self, chain, depth, elems, wrong_depth):
        hashes = CHAINS[chain]
        depth = min(depth, len(hashes))
        key = hashes[depth - 1]
        stored_depth = depth + 1 if wrong_depth else depth  # a buggy caller: the key names another depth
        value = self.next_value
        self.next_value += 1
        state = snapshot(value, elems)
        nbytes = 4 * elems
        ok = self.store.put(key, stored_depth, state)
        if key in self.model or nbytes > BUDGET:
            assert not ok
            return
        assert ok
        while sum(b for _, b, _ in self.model.values()) + nbytes > BUDGET:
            self.model.popitem(last=False)
            self.evicted += 1
        self.model[key] = (stored_depth, nbytes, value)
        self.stored += 1
        for t in state:  # the store holds clones: the caller may reuse its slot at once
            t.fill_(-1.0)

    @rule(chain=st.integers(0, len(CHAINS) - 1), max_depth=st.integers(0, 7))
    def lookup(self, chain, max_depth):
        hashes = CHAINS[chain]
        expected = None
        for d in range(1, min(max_depth, len(hashes)) + 1):  # brute force: every valid depth, keep the deepest
            entry = self.model.get(hashes[d - 1])
            if entry is not None and entry[0] == d:
                expected = d
        got = self.store.lookup_deepest(hashes, max_depth)
        if expected is None:
            assert got is None
            self.misses += 1
            return
        assert got is not None and got[0] == expected
        _, _, value = self.model[hashes[expected - 1]]
        assert torch.equal(torch.cat(got[1]), torch.cat(snapshot(value, self.model[hashes[expected - 1]][1] // 4)))
        self.model.move_to_end(hashes[expected - 1])
        self.hits += 1

    @invariant()
    def matches_model(self):
        s = self.store
        s.check_invariants()
        assert s.bytes_held <= s.budget_bytes
        assert s.bytes_held == sum(b for _, b, _ in self.model.values())
        assert s.lru_order() == list(self.model), "eviction order is not LRU"
        for key, (depth, _, _) in self.model.items():
            assert key in s and s.depth_of(key) == depth
        assert (s.num_stored, s.num_evicted, s.num_hits, s.num_misses) == (
            self.stored,
            self.evicted,
            self.hits,
            self.misses,
        )
        assert s.num_stored - s.num_evicted == len(s)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_lookup_returns_deepest_valid_checkpoint_and_refreshes_it():
    store = CheckpointStore(1000)
    chain = CHAINS[0]
    for d in (1, 3, 4):
        assert store.put(chain[d - 1], d, snapshot(float(d), 4))
    depth, state = store.lookup_deepest(chain, 5)
    assert depth == 4 and torch.equal(state[0], torch.full((2,), 4.0))
    assert store.lookup_deepest(chain, 3)[0] == 3  # capped by max_depth
    assert store.lru_order() == [chain[0], chain[3], chain[2]]
    other = CHAINS[1]  # shares blocks 0 and 1 (tokens 1..4) with chain 0, then diverges
    assert other[:2] == chain[:2] and other[2] != chain[2]
    assert store.lookup_deepest(other, 5)[0] == 1
    assert store.lookup_deepest(CHAINS[3], 5) is None  # salted chain: no block hash in common
    assert store.lookup_deepest(chain, 0) is None
    assert (store.num_hits, store.num_misses) == (3, 2)


def test_too_big_or_duplicate_put_changes_nothing():
    store = CheckpointStore(64)
    chain = CHAINS[0]
    assert store.put(chain[0], 1, snapshot(1.0, 8))  # 32 bytes
    assert store.put(chain[1], 2, snapshot(2.0, 8))
    assert not store.put(chain[2], 3, snapshot(3.0, 17))  # 68 bytes > budget: refused, nothing evicted
    assert len(store) == 2 and store.num_evicted == 0
    assert not store.put(chain[0], 1, snapshot(9.0, 8))  # already there: kept as it was, recency unchanged
    assert store.lru_order() == [chain[0], chain[1]]
    assert torch.equal(store.lookup_deepest(chain[:1], 1)[1][0], torch.full((4,), 1.0))
    assert store.put(chain[2], 3, snapshot(3.0, 8))  # evicts the LRU entry, chain[1] (chain[0] was just hit)
    assert chain[1] not in store and chain[0] in store and store.num_evicted == 1
    store.check_invariants()


def test_bad_arguments():
    with pytest.raises(ValueError):
        CheckpointStore(-1)
    with pytest.raises(ValueError):
        CheckpointStore(100).put(CHAINS[0][0], 0, snapshot(1.0, 2))
