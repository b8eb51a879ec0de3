"""BlockIndex: which replica holds which KV block, for routing a request to its cached prefix.

Keys are block keys (kvserve/kv/events.py: the first 8 bytes of the chain hash of kvserve/kv/hashing.py, cache
salt included), so the router computes a request's keys from its token ids exactly as the engines do, and
tenants with different salts never match each other's blocks. The index learns from two sources:
  KV events   what each engine actually stored and evicted (exact, a little late);
  decisions   the blocks a routed request will store on its replica (at once; confirmed or corrected by the
              events that follow; a request that never ran leaves a stale claim that only costs a prefix
              miss on the next request routed there, which then stores the blocks for real).
A replica's entries go when it leaves the fleet, or when its event stream shows a gap (a lost batch: what it
holds is then unknown, so it is forgotten and relearned).

Each key maps to a bitmask over replica slots, so a match walks the request's blocks once and intersects ints:
O(blocks matched), whatever the number of replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvserve.kv.events import KVEventBatch


class BlockIndex:
    def __init__(self) -> None:
        self._holders: dict[int, int] = {}  # block key -> bitmask of replica slots
        self._slots: dict[str, int] = {}  # replica -> slot
        self._free_slots: list[int] = []
        self._seq: dict[str, int] = {}  # replica -> last event batch applied

    # ------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        """Distinct blocks indexed (held by at least one replica)."""
        return len(self._holders)

    @property
    def replicas(self) -> list[str]:
        return list(self._slots)

    def holds(self, replica: str, key: int) -> bool:
        slot = self._slots.get(replica)
        return slot is not None and bool(self._holders.get(key, 0) >> slot & 1)

    def num_blocks(self, replica: str) -> int:
        """Blocks indexed for one replica (a scan: for tests and metrics, not the routing path)."""
        slot = self._slots.get(replica)
        return 0 if slot is None else sum(mask >> slot & 1 for mask in self._holders.values())

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Replica -> how many of the leading blocks of `keys` it holds (replicas holding none are absent).

        A prefix must be contiguous from block 0: the engines look prefixes up along the chain."""
        depth_by_slot: dict[int, int] = {}
        alive = -1  # every slot
        for depth, key in enumerate(keys):
            held = self._holders.get(key, 0) & alive
            dropped = alive & ~held if alive != -1 else 0
            if depth and dropped:
                for slot in _bits(dropped):
                    depth_by_slot[slot] = depth
            alive = held
            if not alive:
                break
        else:
            for slot in _bits(alive if alive != -1 else 0):
                depth_by_slot[slot] = len(keys)
        names = {slot: name for name, slot in self._slots.items()}
        return {names[slot]: depth for slot, depth in depth_by_slot.items() if slot in names}

    # ------------------------------------------------------------------------------------------- updates
    def add(self, replica: str, keys: Iterable[int]) -> None:
        """Claim blocks for a replica (a routing decision: the request will store them there)."""
        bit = 1 << self._slot(replica)
        holders = self._holders
        for key in keys:
            holders[key] = holders.get(key, 0) | bit

    def remove(self, replica: str, keys: Iterable[int]) -> None:
        slot = self._slots.get(replica)
        if slot is None:
            return
        bit, holders = 1 << slot, self._holders
        for key in keys:
            mask = holders.get(key)
            if mask is not None and mask & bit:
                if mask == bit:
                    del holders[key]
                else:
                    holders[key] = mask & ~bit

    def apply(self, replica: str, batch: KVEventBatch) -> bool:
        """Apply one KV event batch of a replica's engine. Returns False when it shows a lost batch (a gap
        in seq): the replica's earlier entries are then dropped before the batch applies."""
        last = self._seq.get(replica)
        in_order = batch.reset or last is None or batch.seq == last + 1
        # A replica's first batch says `reset` (start from nothing): it knows of no earlier state of ours to
        # correct, so the claims routing made before it arrived stay; a later reset or a gap drops everything.
        if last is not None and (batch.reset or not in_order):
            self.forget(replica)
        self._seq[replica] = batch.seq
        self.remove(replica, batch.removed)
        self.add(replica, batch.stored)
        return in_order

    def forget(self, replica: str) -> None:
        """Drop every entry of a replica (it left the fleet, restarted, or its events were lost)."""
        slot = self._slots.pop(replica, None)
        self._seq.pop(replica, None)
        if slot is None:
            return
        bit, holders = 1 << slot, self._holders
        for key in [k for k, mask in holders.items() if mask & bit]:
            mask = holders[key] & ~bit
            if mask:
                holders[key] = mask
            else:
                del holders[key]
        self._free_slots.append(slot)

    def _slot(self, replica: str) -> int:
        slot = self._slots.get(replica)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slots)
            self._slots[replica] = slot
        return slot


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
