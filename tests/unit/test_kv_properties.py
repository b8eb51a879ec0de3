"""Property tests of the block pool and prefix cache (hypothesis state machine).

A shadow copy of "KV content" records which token each block slot holds. After every operation the tests
check, against that brute-force record, that every running request's computed tokens are still what its
blocks hold (so no referenced block was evicted or overwritten), that ref counts equal the number of block
tables holding a block, and that nothing leaks once every request is freed.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvserve.kv.block_pool import Block, BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.kv.eviction import make_policy, recompute_cost
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 12
# A small alphabet and shared stems make prefix hits common.
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]


class KVMachine(RuleBasedStateMachine):
    policy = "lru"
    window: int | None = None  # sliding window of every layer: blocks below it are given back

    def __init__(self):
        super().__init__()
        args = {"cost": recompute_cost(0.01, BS)} if self.policy == "cost-aware" else {}
        self.pool = BlockPool(NUM_BLOCKS, policy=make_policy(self.policy, **args))
        self.pool.on_evict = self._on_evict
        self.kv = KVCacheManager(self.pool, BS, window=self.window)
        self.num_evicted = 0
        self.running: dict[str, Request] = {}
        self.shadow: dict[tuple[int, int], int] = {}  # (block_id, offset) -> token written there
        self.n = 0

    def _write(self, req: Request, start: int, end: int) -> None:
        ids = self.kv.block_ids(req)
        for pos in range(start, end):
            self.shadow[(ids[pos // BS], pos % BS)] = req.all_token_ids[pos]

    @rule(
        stem=st.sampled_from(STEMS),
        tail=st.lists(st.integers(0, 3), max_size=9),
        chunk=st.integers(1, 12),
        salt=st.sampled_from([None, None, "t1"]),
    )
    def admit(self, stem, tail, chunk, salt):
        req = Request(f"r{self.n}", stem + tail, SamplingParams(), cache_salt=salt)
        self.n += 1
        computed = self.kv.get_computed_blocks(req)
        assert computed.num_tokens <= req.num_tokens - 1
        n = min(chunk, req.num_tokens - computed.num_tokens)
        free_before = self.pool.num_free_blocks
        if not self.kv.allocate_slots(req, n, computed):
            assert self.pool.num_free_blocks == free_before  # a refusal changes nothing
            assert self.kv.num_held(req) == 0
            return
        req.num_computed_tokens = computed.num_tokens
        self._write(req, req.num_computed_tokens, req.num_computed_tokens + n)
        req.num_computed_tokens += n
        self.kv.cache_computed_blocks(req)
        self.running[req.request_id] = req

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 12), token=st.integers(0, 3))
    def step(self, data, chunk, token):
        """Compute the next chunk of a request, or append a decode token when its prompt is done."""
        req = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token)
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        if not self.kv.allocate_slots(req, n):
            return
        self._write(req, req.num_computed_tokens, req.num_computed_tokens + n)
        req.num_computed_tokens += n
        self.kv.cache_computed_blocks(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        req = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        self.kv.free(req)

    def _on_evict(self, block: Block) -> None:
        """A victim is unreferenced, still holds its cached tokens, and is a leaf unless no leaf was left."""
        assert block.ref_count == 0 and block.block_hash is not None
        for off, token in enumerate(block.token_ids):
            assert self.shadow.get((block.block_id, off)) == token, "victim's KV was overwritten before eviction"
        if block.block_hash in self.pool._num_children:
            assert len(self.pool._evictable) == 0, "a parent was evicted while an evictable leaf remained"
        self.num_evicted += 1

    @rule()
    def reset_cache(self):
        self.pool.reset_prefix_cache()

    @invariant()
    def bookkeeping_is_consistent(self):
        self.kv.check_invariants()

    @invariant()
    def computed_kv_is_intact(self):
        for req in self.running.values():
            ids = self.kv.block_ids(req)
            assert len(ids) * BS >= req.num_computed_tokens
            # with a window, only the positions a future query can attend must be intact (and held)
            low = 0 if self.window is None else max(0, req.num_computed_tokens - self.window) // BS * BS
            for pos in range(low, req.num_computed_tokens):
                assert self.kv._blocks[req.request_id][pos // BS] is not None, (req.request_id, pos)
                assert self.shadow.get((ids[pos // BS], pos % BS)) == req.all_token_ids[pos], (req.request_id, pos)

    @invariant()
    def unhashed_blocks_are_never_shared(self):
        owners: dict[int, int] = {}
        for req in self.running.values():
            for b in self.kv._blocks[req.request_id]:
                if b is None:
                    continue
                owners[b.block_id] = owners.get(b.block_id, 0) + 1
                if owners[b.block_id] > 1:
                    assert b.block_hash is not None, f"mutable block {b.block_id} shared"

    def teardown(self):
        for req in list(self.running.values()):
            self.kv.free(req)
        self.kv.check_invariants()
        assert self.pool.num_used_blocks == 0 and self.pool.usage == 0.0


class LFUMachine(KVMachine):
    policy = "lfu"


class CostAwareMachine(KVMachine):
    policy = "cost-aware"


class WindowMachine(KVMachine):
    """Every layer windowed (6 keys): blocks below it given back while requests run, hits skip them."""

    window = 6


for machine in (KVMachine, LFUMachine, CostAwareMachine, WindowMachine):
    machine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestKVPropertiesLRU = KVMachine.TestCase
TestKVPropertiesWindow = WindowMachine.TestCase
TestKVPropertiesLFU = LFUMachine.TestCase
TestKVPropertiesCostAware = CostAwareMachine.TestCase
