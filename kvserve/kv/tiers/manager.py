"""TieredCache: the levels below the fast KV pool, and the moves between them.

    fast pool (the engine's KV tensor, reached only through a BlockIO: block_io.py)
        │ evicted block ──(sync copy, ~0.1 ms)──► host RAM tier (`--cpu-offload-gb`, LRU in bytes)
        │ published block ─(async, writer thread)─► persistent store (`--kv-store disk:PATH | redis://...`)
        ▼
    lookup on admission: pool hits, then the host tier, then the store, each continuing the chain where the
    previous level stopped; hits are copied into newly allocated pool blocks before the prefill is scheduled.
    Store reads run on a fetch thread: while they are in flight the scheduler leaves the request waiting and
    the running requests keep stepping (it waits only when there is nothing else to run).

The persistent store is written through when a block is published (not when it is evicted): another replica
sharing the store, or this server after a restart, can then use a prefix while it is still hot here, and an
eviction never waits for I/O. The writer thread encodes and writes off the step path; if it falls behind by
`max_pending_writes` blocks, further writes are dropped (counted), never queued without bound.

Keys commit to everything that makes KV valid: the block's chain hash (which covers every earlier token and the
tenant's cache salt, an extra key of block 0) and the namespace the engine gives: the model's fingerprint
(kvserve/model/fingerprint.py), block size, dtype and attention arithmetic. A value is verified on read
(codec.py); anything corrupt, truncated, foreign or unreadable is a miss and is recomputed. Backend failures
are counted per tier and logged once per kind. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvserve.kv.hashing import BlockHash
from kvserve.kv.tiers.block_io import BlockIO, Payload
from kvserve.kv.tiers.codec import VERSION, CorruptEntry, decode_block, encode_block
from kvserve.kv.tiers.stores import HostEntry, HostTier, PersistentStore, StoreUnavailable
from kvserve.stats import TierCounters

log = logging.getLogger(__name__)
MAX_KNOWN = 1 << 20  # block hashes remembered as already in the store (~100 MB at most)


@dataclass
class LoadedBlock:
    """A block found below the fast pool, ready to be copied into a pool block."""

    tier: str
    index: int  # position of the block in the request's chain
    block_hash: BlockHash
    token_ids: tuple[int, ...]
    payload: Payload  # the block's KV in host memory, as the BlockIO reads and writes it
    parent_hash: BlockHash | None = None  # the chain hash before it (None for block 0)


class TieredCache:
    """Host RAM and persistent tiers under one engine's KV pool, which block_io reads and writes."""

    def __init__(
        self,
        block_io: BlockIO,
        namespace: str,
        host_bytes: int = 0,
        store: PersistentStore | None = None,
        max_pending_writes: int = 512,
    ):
        self.block_io = block_io
        self.layout = block_io.layout  # what every stored value must match
        self.namespace = namespace
        self.host = HostTier(host_bytes) if host_bytes > 0 else None
        self.store = store
        self.stats: dict[str, TierCounters] = {}
        if self.host is not None:
            self.stats[self.host.name] = TierCounters()
        if store is not None:
            self.stats[store.name] = TierCounters()
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # stats written by the writer thread
        self._known: set[BlockHash] = set()  # in the store already (written or read by us)
        self._writes: queue.Queue = queue.Queue(max_pending_writes)
        self._writer: threading.Thread | None = None
        self._fetcher: ThreadPoolExecutor | None = None
        if store is not None:
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="kvserve-kv-fetch")
            self._writer = threading.Thread(target=self._write_loop, name="kvserve-kv-writer", daemon=True)
            self._writer.start()

    @property
    def tiers(self) -> list[str]:
        return list(self.stats)

    def key(self, block_hash: BlockHash) -> str:
        return f"kvserve-v{VERSION}-{self.namespace}-{block_hash.hex()}"  # a new layout never reads old keys

    def _fault(self, tier: str, kind: str, message: str) -> None:
        with self._lock:
            st = self.stats[tier]
            if kind == "corrupt":
                st.corrupt += 1
            else:
                st.errors += 1
        if (tier, kind) not in self._logged:
            self._logged.add((tier, kind))
            log.warning(
                "KV %s tier: %s (%s); treated as a miss and recomputed. Further %s faults are counted "
                "in kvserve:kv_tier_faults, not logged.",
                tier,
                message,
                kind,
                kind,
            )

    def _unknown(self, block_hashes: Sequence[BlockHash]) -> None:
        """A lookup found these not (or no longer) in the store, or behind a corrupt entry."""
        for h in block_hashes:
            self._known.discard(h)

    def _forget_all(self) -> None:
        """The store was unreachable: it may come back empty (a restarted Redis), so nothing is known to be
        in it any more; blocks are written again as they are computed or hit in the pool."""
        self._known = set()

    # ------------------------------------------------------------------------------ leaving the pool
    def on_evict(self, block) -> None:
        """Pool hook: block is about to lose its KV; keep a copy in host RAM."""
        if self.host is None:
            return
        (payload,) = self.block_io.read([block.block_id])
        nbytes = self.block_io.nbytes(payload)
        evicted_before = self.host.num_evictions
        if self.host.put(block.block_hash, HostEntry(block.token_ids, payload, nbytes)):
            st = self.stats[self.host.name]
            st.stores += 1
            st.bytes_stored += nbytes
            st.evictions += self.host.num_evictions - evicted_before

    def on_cached(self, blocks: Sequence) -> None:
        """Blocks were published in the pool, or hit there: write them through to the persistent store, those
        not known to be there already. One gather and one copy to host memory for all of them (on a GPU, one
        transfer per step rather than one per block); encoding and I/O run on the writer thread. Skipped while
        the store is failing (its blocks stay unknown, and are written when next computed or hit)."""
        if self.store is None or not self.store.writable():
            return
        new = [b for b in blocks if b.block_hash not in self._known]
        if not new:
            return
        payloads = self.block_io.read([b.block_id for b in new])
        for i, block in enumerate(new):
            try:
                self._writes.put_nowait((block.block_hash, block.token_ids, payloads[i]))
            except queue.Full:
                with self._lock:
                    self.stats[self.store.name].dropped_writes += len(new) - i
                return
            if len(self._known) >= MAX_KNOWN:  # a memo, not a ledger: forgetting costs one redundant write
                self._known.clear()
            self._known.add(block.block_hash)

    def _write_loop(self) -> None:
        assert self.store is not None
        name = self.store.name
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                block_hash, token_ids, payload = item
                value = encode_block(token_ids, self.block_io.to_bytes(payload), self.layout)
                try:
                    self.store.put(self.key(block_hash), value)
                except StoreUnavailable as e:
                    self._forget_all()
                    self._fault(name, "unavailable", str(e))
                    continue
                with self._lock:
                    self.stats[name].stores += 1
                    self.stats[name].bytes_stored += len(value)
                    self.stats[name].evictions = self.store.num_evictions  # a bounded disk store's LRU
            except Exception:  # noqa: BLE001 - the writer must survive anything one block does
                log.exception("KV writer failed on one block")
            finally:
                self._writes.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued writes are done (True) or timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 30.0) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)
        if self._writer is not None and self._writer.is_alive():
            self.flush(timeout)
            self._writes.put(None)
            self._writer.join(timeout)
        if self.store is not None:
            self.store.close()

    # ----------------------------------------------------------------------------- coming back
    def lookup_async(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[int], block_size: int, start: int, stop: int
    ) -> Future[list[LoadedBlock]]:
        """lookup() on the fetch thread when a store is configured (it may do I/O), else done at once."""
        if self._fetcher is None:
            done: Future[list[LoadedBlock]] = Future()
            done.set_result(self.lookup(block_hashes, token_ids, block_size, start, stop))
            return done
        hashes, tokens = list(block_hashes[:stop]), list(token_ids[: stop * block_size])
        return self._fetcher.submit(self._safe_lookup, hashes, tokens, block_size, start, stop)

    def _safe_lookup(self, *args) -> list[LoadedBlock]:
        try:
            return self.lookup(*args)
        except Exception:  # noqa: BLE001 - a lookup that fails is a miss; the request recomputes
            log.exception("KV tier lookup failed")
            return []

    def lookup(
        self, block_hashes: Sequence[BlockHash], token_ids: Sequence[int], block_size: int, start: int, stop: int
    ) -> list[LoadedBlock]:
        """Blocks start, start+1, ... (< stop) of a chain found in the host tier, then the store, verified."""
        found: list[LoadedBlock] = []
        i = start

        def tokens(j: int) -> tuple[int, ...]:
            return tuple(token_ids[j * block_size : (j + 1) * block_size])

        if self.host is not None and i < stop:
            t0 = time.perf_counter()
            while i < stop:
                entry = self.host.get(block_hashes[i])
                if entry is None or entry.token_ids != tokens(i):
                    break
                parent = block_hashes[i - 1] if i else None
                found.append(LoadedBlock(self.host.name, i, block_hashes[i], entry.token_ids, entry.payload, parent))
                i += 1
            self._count(self.host.name, found, i < stop, time.perf_counter() - t0)
        if self.store is not None and i < stop:
            t0 = time.perf_counter()
            name = self.store.name
            keys = [self.key(block_hashes[j]) for j in range(i, stop)]
            try:
                values = self.store.get_prefix(keys)
            except StoreUnavailable as e:
                self._forget_all()
                self._fault(name, "unavailable", str(e))
                values = []
            else:
                self._unknown(block_hashes[i + len(values) : stop])  # missing: written again when computed
            from_store: list[LoadedBlock] = []
            for j, value in enumerate(values, start=i):
                try:
                    payload = self.block_io.from_bytes(decode_block(value, tokens(j), self.layout))
                except CorruptEntry as e:
                    self._unknown(block_hashes[j:stop])  # the recomputed blocks are written again
                    self._fault(name, "corrupt", f"entry {keys[j - i]}: {e}")
                    try:
                        self.store.delete(keys[j - i])
                    except StoreUnavailable:
                        pass
                    break
                parent = block_hashes[j - 1] if j else None
                from_store.append(LoadedBlock(name, j, block_hashes[j], tokens(j), payload, parent))
                self._known.add(block_hashes[j])
                self.stats[name].bytes_loaded += len(value)
            found.extend(from_store)
            self._count(name, from_store, i + len(from_store) < stop, time.perf_counter() - t0)
        return found

    def _count(self, tier: str, found: list[LoadedBlock], missed: bool, seconds: float) -> None:
        st = self.stats[tier]
        got = [b for b in found if b.tier == tier]
        st.hits += len(got)
        st.misses += int(missed)
        if got:
            st.loads += 1
            st.load_seconds += seconds
            if tier == "cpu":
                st.bytes_loaded += sum(self.block_io.nbytes(b.payload) for b in got)

    def load_into(self, block_ids: Sequence[int], loaded: Sequence[LoadedBlock]) -> None:
        """Copy loaded blocks into the pool blocks given (same order)."""
        t0 = time.perf_counter()
        self.block_io.write(block_ids, [lb.payload for lb in loaded])
        dt = time.perf_counter() - t0
        if loaded:  # attribute the copy to the tier of the deepest block (the one that made the lookup slow)
            self.stats[loaded[-1].tier].load_seconds += dt
