"""FleetState: the one place a fleet's replicas report to, and the routers and the ingress read from.

A Ray actor (kvserve/fleet/launch.py starts it, named, next to the Serve application). Each engine replica
publishes, every PUBLISH_PERIOD_S: its KV event batches (kvserve/kv/events.py), its engine's stats, and its
rendered /metrics. A router pulls the event log from its cursor; if it fell behind the bounded log, it gets a
snapshot of every replica's blocks instead (a `reset` batch per replica), so it never applies a partial history.
Ray runs one actor's calls in order, and a replica's calls reach it in the order it made them, so each
replica's batches arrive in sequence.

Plain Python (no Ray import): launch.py wraps it with ray.remote, the unit tests call it directly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kvserve.kv.events import KVEventBatch
from kvserve.stats import EngineStats

PUBLISH_PERIOD_S = 0.05
STALE_AFTER_S = 10.0  # a replica silent this long is left out of the stats and metrics


@dataclass(frozen=True)
class Pulled:
    cursor: int  # pass it to the next pull
    batches: list[tuple[str, KVEventBatch]]  # (replica, batch), in arrival order
    stats: dict[str, EngineStats]  # latest stats of every live replica
    covers: dict[str, float]  # wall time up to which each live replica's stats count the requests sent to it


@dataclass
class _Replica:
    blocks: set[int]
    seq: int = 0
    stats: EngineStats | None = None
    metrics: bytes = b""
    seen: float = 0.0
    covers: float = 0.0


class FleetState:
    def __init__(self, max_log: int = 4096):
        self.max_log = max_log
        self._log: deque[tuple[int, str, KVEventBatch]] = deque()  # (position, replica, batch)
        self._next = 1  # position of the next batch
        self._replicas: dict[str, _Replica] = {}

    def publish(
        self,
        replica: str,
        batches: list[KVEventBatch],
        stats: EngineStats | None = None,
        metrics: bytes = b"",
        covers: float = 0.0,
    ) -> None:
        r = self._replicas.setdefault(replica, _Replica(set()))
        for batch in batches:
            if batch.reset:
                r.blocks.clear()
            r.blocks.difference_update(batch.removed)
            r.blocks.update(batch.stored)
            r.seq = batch.seq
            self._log.append((self._next, replica, batch))
            self._next += 1
        while len(self._log) > self.max_log:
            self._log.popleft()
        if stats is not None:
            r.stats = stats
        if metrics:
            r.metrics = metrics
        r.seen = time.monotonic()
        r.covers = max(r.covers, covers)

    def pull(self, cursor: int) -> Pulled:
        """Batches after `cursor` (0 at first). A cursor older than the log gets every replica's blocks as one
        reset batch each."""
        oldest = self._log[0][0] if self._log else self._next
        if cursor + 1 < oldest:
            batches = [
                (name, KVEventBatch(r.seq, tuple(r.blocks), (), reset=True)) for name, r in self._replicas.items()
            ]
        else:
            batches = [(name, batch) for pos, name, batch in self._log if pos > cursor]
        live = [(name, r) for name, r in self._live() if r.stats is not None]
        return Pulled(self._next - 1, batches, {n: r.stats for n, r in live}, {n: r.covers for n, r in live})

    def metrics(self) -> dict[str, bytes]:
        """Each live replica's last /metrics exposition."""
        return {name: r.metrics for name, r in self._live() if r.metrics}

    def forget(self, replica: str) -> None:
        """A replica left (or died): its blocks, stats and metrics go."""
        self._replicas.pop(replica, None)

    def _live(self) -> list[tuple[str, _Replica]]:
        now = time.monotonic()
        return [(name, r) for name, r in self._replicas.items() if now - r.seen < STALE_AFTER_S]
