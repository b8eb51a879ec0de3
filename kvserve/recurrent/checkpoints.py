"""CheckpointStore: exact recurrent-state snapshots, content-addressed by the KV hash chain, in a byte budget.

A recurrent layer's state after the first d blocks of a prompt depends on exactly those d * block_size
tokens (and the extra keys, such as a cache salt, that enter the chain), so the snapshot taken there is keyed
by the chain hash of block d - 1 (`kvserve.kv.hashing`): it is valid for a request exactly when its own
block_hashes[d - 1] equals that key. The stored depth is checked on lookup too, so a key found at the wrong
depth is never served.

Snapshots are the per-layer tensors (conv and SSM state of every recurrent layer), cloned on `put` so the
caller's slot can be overwritten at once; `lookup_deepest` hands back the stored tensors for the caller to
copy into its own slot (callers must not modify them). Clones stay on the tensors' device: the budget counts
bytes of whatever memory they live in.

Eviction is LRU: a hit or a new snapshot makes an entry the most recent, a `put` that does not fit evicts
least recently used entries until it does. A duplicate `put` changes nothing (not even recency), and a
snapshot bigger than the whole budget is refused without evicting anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.kv.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class Checkpoint:
    depth: int  # blocks
    state: tuple[torch.Tensor, ...]
    nbytes: int


def state_nbytes(state: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state)


class CheckpointStore:
    """Snapshots keyed by the chain hash of their last block, LRU-evicted within budget_bytes."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"checkpoint budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[BlockHash, Checkpoint] = OrderedDict()  # least recently used first
        self._depths: dict[int, int] = {}  # depth -> number of entries at that depth
        self._bytes = 0
        self.num_stored = 0  # successful puts, ever
        self.num_hits = 0
        self.num_misses = 0
        self.num_evicted = 0

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._entries

    def depth_of(self, block_hash: BlockHash) -> int | None:
        """The stored depth under this key (no recency change), or None."""
        entry = self._entries.get(block_hash)
        return None if entry is None else entry.depth

    def lru_order(self) -> list[BlockHash]:
        """Keys from the next victim to the most recently used."""
        return list(self._entries)

    def lookup_deepest(
        self, block_hashes: Sequence[BlockHash], max_depth: int, *, count: bool = True
    ) -> tuple[int, list[torch.Tensor]] | None:
        """Deepest stored d <= max_depth with key == block_hashes[d - 1]; marks it used. None on a miss.

        count=False leaves num_hits / num_misses to the caller (a lookup whose admission may not happen)."""
        limit = min(max_depth, len(block_hashes))
        if len(self._depths) < limit:  # few distinct depths stored: try those, deepest first
            candidates = sorted((d for d in self._depths if d <= limit), reverse=True)
        else:
            candidates = range(limit, 0, -1)
        for d in candidates:
            key = block_hashes[d - 1]
            entry = self._entries.get(key)
            if entry is not None and entry.depth == d:
                self._entries.move_to_end(key)
                self.num_hits += count
                return d, list(entry.state)
        self.num_misses += count
        return None

    # ------------------------------------------------------------------------------------------- mutations
    def put(self, block_hash: BlockHash, depth: int, state: Sequence[torch.Tensor]) -> bool:
        """Store clones of state as the snapshot after `depth` blocks. False if already there or too big."""
        if depth < 1:
            raise ValueError(f"a checkpoint sits after at least one block, got depth {depth}")
        if block_hash in self._entries:
            return False
        nbytes = state_nbytes(state)
        if nbytes > self.budget_bytes:
            return False
        while self._bytes + nbytes > self.budget_bytes:
            self._evict_one()
        snapshot = tuple(t.detach().clone() for t in state)
        self._entries[block_hash] = Checkpoint(depth, snapshot, nbytes)
        self._depths[depth] = self._depths.get(depth, 0) + 1
        self._bytes += nbytes
        self.num_stored += 1
        return True

    def _evict_one(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._drop(entry)
        self.num_evicted += 1

    def _drop(self, entry: Checkpoint) -> None:
        self._bytes -= entry.nbytes
        left = self._depths[entry.depth] - 1
        if left:
            self._depths[entry.depth] = left
        else:
            del self._depths[entry.depth]

    def clear(self) -> int:
        """Drop every snapshot (counted as evictions); returns how many were dropped."""
        n = len(self._entries)
        self._entries.clear()
        self._depths.clear()
        self._bytes = 0
        self.num_evicted += n
        return n

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        assert 0 <= self._bytes <= self.budget_bytes, f"{self._bytes} bytes held, budget {self.budget_bytes}"
        assert self._bytes == sum(e.nbytes for e in self._entries.values()), "byte count drifted"
        assert self.num_stored - self.num_evicted == len(self._entries), "an entry was lost or double counted"
        depths: dict[int, int] = {}
        for entry in self._entries.values():
            assert entry.depth >= 1, f"checkpoint at depth {entry.depth}"
            assert entry.nbytes == state_nbytes(entry.state), "an entry's size changed"
            depths[entry.depth] = depths.get(entry.depth, 0) + 1
        assert depths == self._depths, "depth index out of sync"
