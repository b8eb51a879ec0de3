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
snapshot bigger than the whole budget is refused without evicting anything. The LRU itself is the one every
byte-bounded store uses (`kvserve.kv.lru.ByteLRU`); this class adds the depth index and the counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvserve.kv.hashing import BlockHash
from kvserve.kv.lru import ByteLRU

if TYPE_CHECKING:
    import torch


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
        self._entries: ByteLRU[BlockHash, Checkpoint] = ByteLRU(self.budget_bytes, on_evict=self._drop)
        self._depths: dict[int, int] = {}  # depth -> number of entries at that depth
        self.num_stored = 0  # successful puts, ever
        self.num_hits = 0
        self.num_misses = 0

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def bytes_held(self) -> int:
        return self._entries.bytes_held

    @property
    def num_evicted(self) -> int:
        """Snapshots evicted for room or dropped by `clear`, ever."""
        return self._entries.num_evictions

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._entries

    def depth_of(self, block_hash: BlockHash) -> int | None:
        """The stored depth under this key (no recency change), or None."""
        entry = self._entries.peek(block_hash)
        return None if entry is None else entry.depth

    def lru_order(self) -> list[BlockHash]:
        """Keys from the next victim to the most recently used."""
        return self._entries.keys()

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
            entry = self._entries.peek(key)
            if entry is not None and entry.depth == d:
                self._entries.touch(key)
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
            return False  # before cloning: a refused snapshot costs no copy
        snapshot = tuple(t.detach().clone() for t in state)
        self._entries.put(block_hash, Checkpoint(depth, snapshot, nbytes), nbytes)
        self._depths[depth] = self._depths.get(depth, 0) + 1
        self.num_stored += 1
        return True

    def _drop(self, _key: BlockHash, entry: Checkpoint) -> None:
        """The LRU evicted entry: take it out of the depth index."""
        left = self._depths[entry.depth] - 1
        if left:
            self._depths[entry.depth] = left
        else:
            del self._depths[entry.depth]

    def clear(self) -> int:
        """Drop every snapshot (counted as evictions); returns how many were dropped."""
        self._depths.clear()
        return self._entries.clear()

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        self._entries.check_invariants()
        assert self.num_stored - self.num_evicted == len(self._entries), "an entry was lost or double counted"
        depths: dict[int, int] = {}
        entries = [self._entries.peek(key) for key in self._entries.keys()]
        assert sum(e.nbytes for e in entries) == self.bytes_held, "an entry's recorded size drifted"
        for entry in entries:
            assert entry.depth >= 1, f"checkpoint at depth {entry.depth}"
            assert entry.nbytes == state_nbytes(entry.state), "an entry's size changed"
            depths[entry.depth] = depths.get(entry.depth, 0) + 1
        assert depths == self._depths, "depth index out of sync"
