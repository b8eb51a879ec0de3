"""Eviction policies: which unreferenced cached block gives up its KV when the pool needs a block.

Contract: a policy holds exactly the blocks with ref_count == 0 that still carry a block hash ("evictable").
`add` is called when a block becomes evictable, `remove` when a cache hit revives it, `pop` picks the victim.
Every operation is O(1) for LRU. A block that is referenced is never in a policy, so it can never be evicted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.kv.block_pool import Block


class EvictionPolicy(ABC):
    """The set of evictable blocks and the order in which they are evicted."""

    @abstractmethod
    def add(self, block: Block) -> None:
        """block became evictable (ref_count dropped to 0 while cached)."""

    @abstractmethod
    def remove(self, block: Block) -> None:
        """block was revived by a cache hit; it must no longer be a victim."""

    @abstractmethod
    def pop(self) -> Block:
        """Remove and return the next victim. Raises IndexError when empty."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, block: Block) -> bool: ...


class LRUPolicy(EvictionPolicy):
    """Least recently freed first: an intrusive doubly linked list with sentinel head and tail.

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

    def __len__(self) -> int:
        return len(self._prev)

    def __contains__(self, block: Block) -> bool:
        return block.block_id in self._prev

    def __iter__(self):
        block = self._first
        while block is not None:
            yield block
            block = self._next[block.block_id]


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
