"""ByteLRU: a map bounded in bytes, least recently used out first; the one LRU under every store of sizes.

Used by the host-RAM KV tier (values are host tensors), the bounded disk store's index over its files
(values are file sizes; evicting unlinks the file) and the recurrent-state checkpoint store.

What must stay true (`check_invariants`): bytes_held is the sum of the sizes of the entries held, and never
above capacity_bytes. `put` of an entry bigger than the whole capacity is refused and changes nothing (no
entry is evicted for it); otherwise it replaces the key's old entry (not an eviction) and evicts least
recently used entries until the new one fits. `get` and `touch` make an entry the most recent; `peek`,
`in` and `keys` do not. Every method holds one lock, so the map may be shared by threads; the eviction
callback runs under it and must not call back into the map.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """key -> (value, size in bytes), within capacity_bytes; on_evict(key, value) for every eviction."""

    def __init__(self, capacity_bytes: int, on_evict: Callable[[K, V], None] | None = None):
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.on_evict = on_evict
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.bytes_held = 0
        self.num_evictions = 0  # entries dropped to make room (and by clear), not replaced or popped ones

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """Keys from the next victim to the most recently used."""
        with self._lock:
            return list(self._entries)

    def put(self, key: K, value: V, nbytes: int) -> bool:
        """Store value as the most recent entry, evicting LRU entries to make room. False (and no change at
        all) if nbytes exceeds the whole capacity."""
        if nbytes < 0:
            raise ValueError(f"an entry's size must be >= 0 bytes, got {nbytes}")
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_held -= old[1]
            while self.bytes_held + nbytes > self.capacity_bytes:
                victim, (victim_value, size) = self._entries.popitem(last=False)
                self.bytes_held -= size
                self.num_evictions += 1
                if self.on_evict is not None:
                    self.on_evict(victim, victim_value)
            self._entries[key] = (value, nbytes)
            self.bytes_held += nbytes
        return True

    def get(self, key: K) -> V | None:
        """The value, made the most recent entry; None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The value without changing recency; None if absent."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: K) -> bool:
        """Make key the most recent entry; False if absent."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            return True

    def pop(self, key: K) -> V | None:
        """Remove key (not counted as an eviction, no callback); its value, or None if absent."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self.bytes_held -= entry[1]
            return entry[0]

    def clear(self) -> int:
        """Drop every entry, counted as evictions (the callback is not called); how many were dropped."""
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self.bytes_held = 0
            self.num_evictions += n
            return n

    def check_invariants(self) -> None:
        """Raise AssertionError if the byte count drifted or exceeds the capacity."""
        with self._lock:
            held = sum(size for _, size in self._entries.values())
        assert self.bytes_held == held, f"bytes_held {self.bytes_held} != {held} in the entries"
        assert 0 <= self.bytes_held <= self.capacity_bytes, f"{self.bytes_held} bytes held > {self.capacity_bytes}"
