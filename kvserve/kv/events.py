"""KV events: what a pool stored in and removed from its prefix index, for a router's index of the fleet.

The block pool reports every block it indexes (`stored`) and every indexed block it drops (`removed`, on
eviction or a prefix-cache reset) to an optional KVEventLog. A replica drains the log in batches and sends
them to the router (kvserve/router/), so the router's index of "which replica holds which block" forgets
what an engine evicted instead of guessing. Keys are the first 8 bytes of the chain hash
(kvserve/kv/hashing.py) as an int: the router computes the same chain from a request's token ids and cache
salt, so its lookups need no tokens; a (vanishingly rare) key collision could only misroute a request, never
serve wrong KV (the pool still compares token ids on every hit).

Bounded: if nobody drains for `max_events`, the log drops what it holds and marks the next batch `reset`;
the receiver then forgets everything it knew of this pool and relearns from the batches that follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.kv.hashing import BlockHash


def block_key(block_hash: BlockHash) -> int:
    """The router's key of a chain hash: its first 8 bytes (an int keeps the index small)."""
    return int.from_bytes(block_hash[:8], "little")


@dataclass(frozen=True)
class KVEventBatch:
    """Events since the previous batch, in order. reset: forget this pool's earlier state first."""

    seq: int  # 1, 2, ... per log: a receiver that sees a gap knows it lost a batch
    stored: tuple[int, ...]
    removed: tuple[int, ...]
    reset: bool = False


class KVEventLog:
    """Stored/removed block keys of one pool since the last drain(). Not thread-safe: the engine thread
    writes and drains it (the replica hands the batches on)."""

    def __init__(self, max_events: int = 1 << 20):
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        # One ordered list: a block stored then removed (or the reverse) within a batch keeps its last state.
        self._events: list[tuple[bool, int]] = []
        self._reset = True  # the first batch tells the receiver to start from nothing
        self._seq = 0

    def stored(self, block_hash: BlockHash) -> None:
        self._add(True, block_key(block_hash))

    def removed(self, block_hash: BlockHash) -> None:
        self._add(False, block_key(block_hash))

    def _add(self, stored: bool, key: int) -> None:
        if len(self._events) >= self.max_events:  # nobody drains: start over rather than grow
            self._events.clear()
            self._reset = True
        self._events.append((stored, key))

    def drain(self) -> KVEventBatch | None:
        """Everything since the last drain, folded to each key's last state; None if nothing happened.
        Batches are numbered 1, 2, ... without gaps, so a receiver that sees a gap knows it lost one."""
        if not self._events and not self._reset:
            return None
        last: dict[int, bool] = {}
        for stored, key in self._events:
            last.pop(key, None)  # re-insert: the dict keeps the last event's order
            last[key] = stored
        self._events.clear()
        self._seq += 1
        reset, self._reset = self._reset, False
        return KVEventBatch(
            seq=self._seq,
            stored=tuple(k for k, s in last.items() if s),
            removed=tuple(k for k, s in last.items() if not s),
            reset=reset,
        )
