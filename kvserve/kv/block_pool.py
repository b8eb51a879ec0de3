"""BlockPool: the fixed set of KV blocks, their reference counts, and the prefix index over them.

A block is in exactly one of three states:
  referenced   ref_count > 0            owned by one or more running requests (shared when > 1)
  evictable    ref_count == 0, hashed   holds a cached prefix block; revived by a hit, reused when evicted
  empty        ref_count == 0, no hash  holds nothing worth keeping; handed out first
Allocation takes empty blocks first and only then asks the eviction policy for a victim, whose hash entry is
dropped at that moment (lazy eviction). A referenced block is never in the policy, so it can't be evicted.

Leaves first: evicting a block that other cached blocks chain from (a parent) would make every descendant
unreachable (lookups walk the chain from block 0). When the policy's candidate is such a parent, the pool sets
it aside in `_parents` and asks again; when its last cached child is evicted, it goes back to the policy at
the rank it had. Only when no other evictable block is left (every cached child of the remaining parents is
referenced) is a parent taken anyway; its orphaned children reconnect as soon as the parent's content is cached
again, since addresses are content hashes.
`on_evict(block)` runs just before a victim's hash is dropped, while its KV is still intact (the tier hook).
`events`, when set, hears of every block indexed and every indexed block dropped (kvserve/kv/events.py: what a
replica tells the fleet's router).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NewType

from kvserve.kv.events import KVEventLog
from kvserve.kv.eviction import EvictionPolicy, LRUPolicy
from kvserve.kv.hashing import BlockHash

BlockId = NewType("BlockId", int)


@dataclass(eq=False, slots=True)
class Block:
    block_id: BlockId
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None  # the block's tokens, compared on every hit
    parent_hash: BlockHash | None = None  # chain hash of the block before it (None for block 0)
    depth: int = 0  # index of the block in its chain (0 = first block of a prompt)
    hits: int = 0  # times it was taken since it was cached (1 = its own request); read by LFU/cost policies
    evict_priority: float = 0.0  # rank a priority policy gave it when it became evictable
    evict_seq: int = 0  # and its tie-break: the order in which blocks became evictable


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    """num_blocks KV blocks with ref counts and a content-addressed index of full blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, policy: EvictionPolicy | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        # Stack of empty blocks; popped from the end, so low ids go first.
        self._empty: list[Block] = list(reversed(self.blocks))
        self._evictable: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._parents: dict[BlockId, Block] = {}  # evictable blocks that cached blocks chain from
        self._num_children: dict[BlockHash, int] = {}  # cached blocks per parent hash
        self._cached: dict[BlockHash, Block] = {}
        self.num_evictions = 0
        self.on_evict: Callable[[Block], None] | None = None
        self.events: KVEventLog | None = None

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocate() can hand out now (empty + evictable)."""
        return len(self._empty) + len(self._evictable) + len(self._parents)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running requests (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> Block | None:
        """The cached block holding exactly these tokens under this chain hash, or None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    # ------------------------------------------------------------------------------------------- mutations
    def allocate(self, n: int) -> list[Block]:
        """Take n free blocks (ref_count becomes 1). Raises NoFreeBlocksError, taking nothing, if short."""
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {n} KV blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self._empty.pop() if self._empty else self._evict()
            assert block.ref_count == 0 and block.block_hash is None
            block.ref_count = 1
            out.append(block)
        return out

    def _evict(self) -> Block:
        while len(self._evictable):
            block = self._evictable.pop()
            if self._is_leaf(block):
                break
            self._parents[block.block_id] = block  # back in the policy when its last cached child goes
        else:  # every leaf is referenced: a parent must go (its cached children become unreachable for now)
            block = self._parents.pop(next(iter(self._parents)))
        if self.on_evict is not None:
            self.on_evict(block)
        if self.events is not None:
            self.events.removed(block.block_hash)
        del self._cached[block.block_hash]
        self._drop_child(block.parent_hash)
        block.block_hash = block.token_ids = block.parent_hash = None
        block.depth = block.hits = 0
        self.num_evictions += 1
        return block

    def _is_leaf(self, block: Block) -> bool:
        return block.block_hash not in self._num_children

    def _add_child(self, parent_hash: BlockHash | None) -> None:
        if parent_hash is not None:
            self._num_children[parent_hash] = self._num_children.get(parent_hash, 0) + 1

    def _drop_child(self, parent_hash: BlockHash | None) -> None:
        if parent_hash is None:
            return
        left = self._num_children[parent_hash] - 1
        if left:
            self._num_children[parent_hash] = left
            return
        del self._num_children[parent_hash]
        parent = self._cached.get(parent_hash)
        if parent is not None and parent.block_id in self._parents:
            del self._parents[parent.block_id]
            self._evictable.readd(parent)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a cache hit); revives evictable blocks."""
        for block in blocks:
            if block.ref_count == 0:
                if self._parents.pop(block.block_id, None) is None:
                    self._evictable.remove(block)
            block.ref_count += 1
            block.hits += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block, in the order given (the first freed is evicted first)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise AssertionError(f"double free of KV block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable.add(block)
                else:
                    self._empty.append(block)

    def cache_block(
        self,
        block: Block,
        block_hash: BlockHash,
        token_ids: Sequence[int],
        parent_hash: BlockHash | None = None,
        depth: int = 0,
    ) -> bool:
        """Index a full, computed block under its chain hash. Returns False if not indexed.

        When another block already holds the same content (two requests computed one prefix at once), the
        first stays the cached copy and this one stays private; it is freed as empty later.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        assert block.ref_count > 0, "only a referenced block can be filled and cached"
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        block.parent_hash = parent_hash
        block.depth = depth
        block.hits = max(block.hits, 1)
        self._cached[block_hash] = block
        self._add_child(parent_hash)
        if self.events is not None:
            self.events.stored(block_hash)
        return True

    def cached_block(self, block_hash: BlockHash) -> Block | None:
        return self._cached.get(block_hash)

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block; returns how many were dropped."""
        dropped = 0
        while len(self._evictable) or self._parents:
            self._empty.append(self._evict())
            dropped += 1
        return dropped

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        empty_ids = {b.block_id for b in self._empty}
        assert len(empty_ids) == len(self._empty), "a block is twice in the empty list"
        assert len(self._evictable) + len(self._parents) + len(self._empty) <= self.num_blocks
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has negative ref count"
            in_policy = block in self._evictable
            in_parents = block.block_id in self._parents
            assert not (in_policy and in_parents), f"block {block.block_id} both leaf and parent"
            if block.ref_count > 0:
                assert block.block_id not in empty_ids and not in_policy and not in_parents, (
                    f"referenced block {block.block_id} free"
                )
            elif block.block_hash is not None:
                assert block.block_id not in empty_ids, f"cached free block {block.block_id} also empty"
                assert in_policy or in_parents, f"cached free block {block.block_id} lost"
                assert not in_parents or not self._is_leaf(block), f"leaf {block.block_id} set aside"
            else:
                assert block.block_id in empty_ids and not in_policy and not in_parents, (
                    f"empty block {block.block_id} leaked"
                )
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"block {block.block_id} not indexed"
                assert block.token_ids is not None
        assert all(b.block_hash == h for h, b in self._cached.items())
        children: dict[BlockHash, int] = {}
        for b in self._cached.values():
            if b.parent_hash is not None:
                children[b.parent_hash] = children.get(b.parent_hash, 0) + 1
        assert children == self._num_children, "child counts out of date"
