"""Eviction policies: which unreferenced cached block gives up its KV when the pool needs a block.

Contract: a policy holds evictable blocks: ref_count == 0 and still carrying a block hash. `add` is called when a
block becomes evictable (its last reference is freed) and fixes its rank, `remove` when a cache hit revives it,
`pop` returns the next candidate. Leaves first: when the candidate is a parent of other cached blocks, the pool
sets it aside (evicting it would make every cached descendant unreachable) and pops again; once its last cached
child is gone it hands the block back with `readd`, and it returns to the rank it had, which is older than
anything added since (a parent is freed after its children, so this is rare and cheap). The pool counts hits
on `Block.hits` and records the block's depth in the chain (`Block.depth`, in blocks from the start of the
prompt); policies read them in `add`.

  lru         least recently freed first. Intrusive doubly linked list: O(1) per operation.
  lfu         least frequently used first, with dynamic aging (LFU-DA, Arlitt et al. 2000): priority =
              L + hits, where L is the priority of the last victim. Aging lets a block that was hot long ago
              leave once newer blocks have earned more; without it LFU keeps dead blocks forever.
  cost-aware  GreedyDual-Size-Frequency (Cherkasova 1998) on reuses: priority = L + reuses * cost / size,
              where reuses = hits - 1 (cache hits after the request that computed it), cost is the compute a
              miss on this block would redo (its block_size tokens through every linear layer plus attention
              over the `depth * block_size` tokens before it) and size its bytes (equal for all blocks of one
              pool, so it only scales L). The expected recompute an eviction causes is (chance of another use)
              x cost; past reuses estimate the first factor, and a block nobody reused (a one-off prompt, a
              scan) has no evidence of future value, so such blocks go first, oldest first. L ages everything.
Heap policies are O(log n) per operation with lazy deletion. Ties go to the block that became evictable first.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.kv.block_pool import Block


class EvictionPolicy(ABC):
    """The set of evictable leaf blocks and the order in which they are evicted."""

    @abstractmethod
    def add(self, block: Block) -> None:
        """block became an evictable leaf (ref_count 0, cached, no cached child)."""

    @abstractmethod
    def remove(self, block: Block) -> None:
        """block was revived by a cache hit or gained a cached child; it must no longer be a victim."""

    @abstractmethod
    def pop(self) -> Block:
        """Remove and return the next victim. Raises IndexError when empty."""

    @abstractmethod
    def readd(self, block: Block) -> None:
        """A block pop() returned and the pool set aside comes back with the rank it had."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, block: Block) -> bool: ...


class LRUPolicy(EvictionPolicy):
    """Least recently freed first: an intrusive doubly linked list.

    Requests free their blocks deepest-first, so within one request the leaves of the prefix go first and a
    parent outlives its children.
    """

    def __init__(self) -> None:
        self._prev: dict[int, Block | None] = {}
        self._next: dict[int, Block | None] = {}
        self._first: Block | None = None
        self._last: Block | None = None

    def add(self, block: Block) -> None:
        assert block.block_id not in self._prev, f"block {block.block_id} already evictable"
        self._prev[block.block_id] = self._last
        self._next[block.block_id] = None
        if self._last is None:
            self._first = block
        else:
            self._next[self._last.block_id] = block
        self._last = block

    def remove(self, block: Block) -> None:
        prev = self._prev.pop(block.block_id)
        nxt = self._next.pop(block.block_id)
        if prev is None:
            self._first = nxt
        else:
            self._next[prev.block_id] = nxt
        if nxt is None:
            self._last = prev
        else:
            self._prev[nxt.block_id] = prev

    def pop(self) -> Block:
        if self._first is None:
            raise IndexError("no evictable block")
        block = self._first
        self.remove(block)
        return block

    def readd(self, block: Block) -> None:
        """Back to the front: it was the least recent when popped, and everything added since is newer."""
        assert block.block_id not in self._prev, f"block {block.block_id} already evictable"
        self._prev[block.block_id] = None
        self._next[block.block_id] = self._first
        if self._first is None:
            self._last = block
        else:
            self._prev[self._first.block_id] = block
        self._first = block

    def __len__(self) -> int:
        return len(self._prev)

    def __contains__(self, block: Block) -> bool:
        return block.block_id in self._prev

    def __iter__(self):
        block = self._first
        while block is not None:
            yield block
            block = self._next[block.block_id]


class GreedyDualPolicy(EvictionPolicy):
    """Smallest priority L + value(block) first; L inflates to each victim's priority (dynamic aging).

    value(block) is fixed when the block is added; a hit removes it from the policy, so the next add (when
    it is freed again) sees the new hit count.
    """

    def __init__(self, value: Callable[[Block], float]):
        self._value = value
        self._heap: list[tuple[float, int, Block]] = []
        self._live: dict[int, int] = {}  # block_id -> sequence number of its live heap entry
        self._seq = itertools.count()
        self.inflation = 0.0  # L

    def priority(self, block: Block) -> float:
        return self.inflation + self._value(block)

    def add(self, block: Block) -> None:
        self._push(block, self.priority(block), next(self._seq))

    def readd(self, block: Block) -> None:
        """Back with the priority and the tie-break rank it had: older than equal-priority blocks added since."""
        self._push(block, block.evict_priority, block.evict_seq)

    def _push(self, block: Block, priority: float, seq: int) -> None:
        assert block.block_id not in self._live, f"block {block.block_id} already evictable"
        self._live[block.block_id] = seq
        block.evict_priority, block.evict_seq = priority, seq
        heapq.heappush(self._heap, (priority, seq, block))
        if len(self._heap) > 2 * len(self._live) + 64:  # drop stale entries so the heap stays O(live)
            self._heap = [e for e in self._heap if self._live.get(e[2].block_id) == e[1]]
            heapq.heapify(self._heap)

    def remove(self, block: Block) -> None:
        del self._live[block.block_id]  # its heap entry goes stale and is skipped by pop

    def pop(self) -> Block:
        while self._heap:
            prio, seq, block = heapq.heappop(self._heap)
            if self._live.get(block.block_id) == seq:
                del self._live[block.block_id]
                self.inflation = max(self.inflation, prio)
                return block
        raise IndexError("no evictable block")

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, block: Block) -> bool:
        return block.block_id in self._live


class LFUPolicy(GreedyDualPolicy):
    """LFU with dynamic aging (LFU-DA): priority = L + hits."""

    def __init__(self) -> None:
        super().__init__(lambda b: float(b.hits))


def recompute_cost(attention_per_context_token: float, block_size: int) -> Callable[[int], float]:
    """Cost, in units of one token through the linear layers, of recomputing a block at a given depth.

    attention_per_context_token = attention FLOPs per query per context token / linear FLOPs per token.
    """

    def cost(depth: int) -> float:
        context = depth * block_size + (block_size - 1) / 2  # mean context length of the block's tokens
        return block_size * (1.0 + attention_per_context_token * context)

    return cost


class CostAwarePolicy(GreedyDualPolicy):
    """GreedyDual-Size-Frequency on reuses: priority = L + (hits - 1) * recompute cost / bytes."""

    def __init__(self, cost: Callable[[int], float] | None = None, block_bytes: int = 1):
        cost = cost if cost is not None else recompute_cost(0.0, 1)
        super().__init__(lambda b: max(b.hits - 1, 0) * cost(b.depth) / block_bytes)


POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "cost-aware": CostAwarePolicy,
}


def make_policy(name: str, **cost_args) -> EvictionPolicy:
    """A fresh policy by name; cost_args (cost=, block_bytes=) go to the cost-aware policy only."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**cost_args) if name == "cost-aware" else POLICIES[name]()
