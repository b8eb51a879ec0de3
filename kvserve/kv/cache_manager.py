"""KVCacheManager: each request's block table, prefix-cache lookups, and the blocks it holds.

For a request with block table [b0, b1, ..., bk]:
  [0, num_computed_tokens)   KV written (or shared from the cache)
  full blocks below num_computed_tokens are indexed by hash after the step that filled them ran, so a
  failed step can never publish garbage KV. The partially filled last block is private to its request:
  it is never indexed, hence never shared mutably.

Sliding windows: where every layer of the model attends only the last `window` positions, a block that lies
wholly below every future query's window is given back to the pool while its request runs (it stays indexed,
so it is a prefix-cache block like any other, evicted when the pool needs room), and a prefix hit takes no
block it would give back at once. Its place in the block table holds None (block id 0 in the tables the
runner reads: a position no window reaches, masked as table padding is).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from kvserve.kv.block_pool import Block, BlockPool
from kvserve.kv.hashing import hash_block_chain
from kvserve.kv.tiers import LoadedBlock, TieredCache
from kvserve.request import Request


@dataclass
class ComputedBlocks:
    """A prefix-cache hit: pool blocks to share, then blocks to load from lower tiers, and their tokens."""

    blocks: list[Block] = field(default_factory=list)
    num_tokens: int = 0
    loads: list[LoadedBlock] = field(default_factory=list)  # chain blocks len(blocks), len(blocks) + 1, ...
    pending: bool = False  # a lower-tier lookup is still in flight; ask again next step


class KVCacheManager:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        enable_caching: bool = True,
        tiers: TieredCache | None = None,
        window: int | None = None,
    ):
        self.pool = pool
        self.window = window  # every layer's keys: the last `window` positions (None: all)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.tiers = tiers if enable_caching else None
        # request id -> (first block looked up below the pool, the lookup): a waiting request is looked up
        # every step until it is admitted; the tiers are asked once per starting point.
        self._lower_hits: dict[str, tuple[int, Future[list[LoadedBlock]]]] = {}
        self._blocks: dict[str, list[Block | None]] = {}  # None: given back, below every window
        self._released: dict[str, int] = {}  # leading blocks given back
        self._num_indexed: dict[str, int] = {}  # full blocks of the request already offered to the index
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ------------------------------------------------------------------------------------------- hashing
    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its tokens."""
        hashes = request.block_hashes
        if len(hashes) == request.num_tokens // self.block_size:
            return
        hashes.extend(
            hash_block_chain(
                request.all_token_ids,
                self.block_size,
                request.extra_keys,
                parent=hashes[-1] if hashes else None,
                start_block=len(hashes),
            )
        )

    # ------------------------------------------------------------------------------------------- lookups
    def get_computed_blocks(self, request: Request, wait: bool = True) -> ComputedBlocks:
        """The longest cached chain of full blocks at the start of the request.

        The last token is never served from cache: its logits are needed to sample, so at most
        num_tokens - 1 tokens (rounded down to whole blocks) can hit. With wait=False, a lower-tier lookup
        still in flight gives `pending=True` (and only the pool hits) instead of blocking.
        """
        if not self.enable_caching:
            return ComputedBlocks()
        self.update_block_hashes(request)  # also for the next case: checkpoints are stored at their hashes
        if request.needs_prompt_logprobs:  # cached positions have no logits
            return ComputedBlocks()
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        bs = self.block_size
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, request.all_token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hit.append(block)
        loads: list[LoadedBlock] = []
        if self.tiers is not None and len(hit) < max_blocks:
            memo = self._lower_hits.get(request.request_id)
            if memo is None or memo[0] != len(hit):
                args = (request.block_hashes, request.all_token_ids, bs, len(hit), max_blocks)
                memo = self._lower_hits[request.request_id] = (len(hit), self.tiers.lookup_async(*args))
            if not wait and not memo[1].done():
                return ComputedBlocks(hit, len(hit) * bs, pending=True)
            loads = memo[1].result()
        return ComputedBlocks(hit, (len(hit) + len(loads)) * bs, loads)

    def record_query(self, request: Request, computed: ComputedBlocks) -> None:
        """Count a first admission's lookup in the hit-rate statistics (in tokens)."""
        self.prefix_queries += request.num_tokens
        self.prefix_hits += computed.num_tokens

    # ------------------------------------------------------------------------------------------ allocation
    def allocate_slots(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> bool:
        """Make room for num_new_tokens more tokens after the computed ones (and after a cache hit).

        Returns False, changing nothing, when the pool is too short; the scheduler then preempts or waits.
        """
        computed = computed or ComputedBlocks()
        held = self._blocks.get(request.request_id, [])
        total_tokens = request.num_computed_tokens + computed.num_tokens + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - len(held) - len(computed.blocks)
        skip = self._out_of_window(request.num_computed_tokens + computed.num_tokens) - len(held)
        hits = computed.blocks[max(skip, 0) :]  # a hit block below every window is not taken
        # Hit blocks nobody references sit in the free count; taking them shrinks it.
        num_revived = sum(1 for b in hits if b.ref_count == 0)
        if max(num_needed, 0) + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(hits)
        if self.tiers is not None:  # a store that lost entries (restart, its own eviction) gets them back
            self.tiers.on_cached(computed.blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        if computed.loads:
            self._load(computed, new_blocks[: len(computed.loads)])
        self._lower_hits.pop(request.request_id, None)
        gone: list[Block | None] = [None] * (len(computed.blocks) - len(hits))
        self._blocks[request.request_id] = held + gone + hits + new_blocks
        if gone:
            self._released[request.request_id] = max(self._released.get(request.request_id, 0), len(held) + len(gone))
        num_hit = len(computed.blocks) + len(computed.loads)
        if num_hit:
            self._num_indexed.setdefault(request.request_id, num_hit)
        return True

    def _load(self, computed: ComputedBlocks, blocks: list[Block]) -> None:
        """Write blocks found in lower tiers into fresh pool blocks and publish them (their KV is now valid)."""
        assert self.tiers is not None
        self.tiers.load_into([b.block_id for b in blocks], computed.loads)
        for block, lb in zip(blocks, computed.loads, strict=True):
            self.pool.cache_block(block, lb.block_hash, lb.token_ids, lb.parent_hash, lb.index)

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the request's full blocks whose KV is now written (call after the step ran), then give back
        the ones below every window."""
        self._index_computed(request)
        self.release_out_of_window(request)

    def _index_computed(self, request: Request) -> None:
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_indexed.get(request.request_id, 0)
        if num_full <= start:
            return
        self.update_block_hashes(request)
        blocks = self._blocks[request.request_id]
        bs = self.block_size
        hashes = request.block_hashes
        published = []
        for i in range(start, num_full):
            parent = hashes[i - 1] if i else None
            tokens = request.all_token_ids[i * bs : (i + 1) * bs]
            if self.pool.cache_block(blocks[i], hashes[i], tokens, parent, i):
                published.append(blocks[i])
        if published and self.tiers is not None:
            self.tiers.on_cached(published)
        self._num_indexed[request.request_id] = num_full

    def release_out_of_window(self, request: Request) -> None:
        """Give back the blocks no future query of the request attends (call after its KV is indexed)."""
        blocks = self._blocks.get(request.request_id)
        if self.window is None or not blocks:
            return
        first = self._released.get(request.request_id, 0)
        upto = min(self._out_of_window(request.num_computed_tokens), len(blocks))
        if upto <= first:
            return
        gone = [b for b in blocks[first:upto] if b is not None]
        blocks[first:upto] = [None] * (upto - first)
        self._released[request.request_id] = upto
        self.pool.free(reversed(gone))

    def _out_of_window(self, num_computed: int) -> int:
        """Leading blocks wholly below the window of every query at position >= num_computed."""
        if self.window is None:
            return 0
        return max(0, num_computed - self.window) // self.block_size

    def free(self, request: Request) -> None:
        """Release every block of the request, deepest first so that leaves are evicted before parents."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_indexed.pop(request.request_id, None)
        self._lower_hits.pop(request.request_id, None)
        self._released.pop(request.request_id, None)
        self.pool.free(reversed([b for b in blocks if b is not None]))

    def block_ids(self, request: Request) -> list[int]:
        return [0 if b is None else b.block_id for b in self._blocks.get(request.request_id, [])]

    def num_held(self, request: Request) -> int:
        return sum(b is not None for b in self._blocks.get(request.request_id, []))

    @property
    def num_requests(self) -> int:
        return len(self._blocks)

    def check_invariants(self) -> None:
        """Pool invariants plus: every block's ref count equals the number of block tables holding it."""
        self.pool.check_invariants()
        counts: dict[int, int] = {}
        for blocks in self._blocks.values():
            for b in blocks:
                if b is not None:
                    counts[b.block_id] = counts.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            assert b.ref_count == counts.get(b.block_id, 0), f"block {b.block_id} ref count {b.ref_count} wrong"
