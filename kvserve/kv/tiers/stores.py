"""Where evicted KV blocks live below the fast pool.

  HostTier     host RAM, bounded in bytes, LRU; holds BlockIO payloads as they are (CPU tensors, no
               encoding), so a hit is one copy.
  DiskStore    one file per block under a directory, written to a temp name and renamed (a reader never sees
               half a file); the embedded default for `--kv-store disk:PATH`.
  RedisStore   a Redis server shared by replicas (`--kv-store redis://HOST:PORT/DB`); MGET for lookups.

Persistent stores (disk, Redis) hold encoded values (see codec.py) and raise `StoreUnavailable` when the
backend fails (I/O error, full disk, Redis down): the tier manager counts it, logs it once, and treats it as a
miss, so a request recomputes instead of failing. A Redis store that failed is not asked again for
`retry_after_s` seconds, so a dead Redis costs one timeout, not one per request.

Both bounded stores (the host tier, a disk store with max_bytes) keep their LRU order in one `ByteLRU`
(kvserve/kv/lru.py). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvserve.config import kv_store_kind
from kvserve.kv.lru import ByteLRU
from kvserve.kv.tiers.block_io import Payload


class StoreUnavailable(RuntimeError):
    """The backend failed; the operation did nothing."""


# -------------------------------------------------------------------------------------------- host RAM
@dataclass(frozen=True)
class HostEntry:
    """One block in host RAM: its tokens (checked on a hit) and its KV as the BlockIO read it."""

    token_ids: tuple[int, ...]
    payload: Payload  # BlockIO.read's value, e.g. a CPU tensor (layers, 2, kv_heads, block_size, head_dim)
    nbytes: int  # BlockIO.nbytes(payload)


class HostTier:
    """A byte-bounded LRU map from block key to HostEntry. Thread-safe."""

    name = "cpu"

    def __init__(self, capacity_bytes: int):
        self._lru: ByteLRU[bytes, HostEntry] = ByteLRU(capacity_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self._lru.capacity_bytes

    @property
    def bytes_held(self) -> int:
        return self._lru.bytes_held

    @property
    def num_evictions(self) -> int:
        return self._lru.num_evictions

    def put(self, key: bytes, entry: HostEntry) -> bool:
        """Keep entry as the most recent, evicting LRU entries for room; False if it exceeds the whole tier."""
        return self._lru.put(key, entry, entry.nbytes)

    def get(self, key: bytes) -> HostEntry | None:
        """The entry, made the most recent; None if absent."""
        return self._lru.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)


# ------------------------------------------------------------------------------------ persistent stores
class PersistentStore(ABC):
    """A key-value datastore of encoded blocks. Keys are printable strings without '/'."""

    name: str

    @abstractmethod
    def get_prefix(self, keys: Sequence[str]) -> list[bytes]:
        """Values of the longest run of present keys from keys[0] on (stops at the first missing one)."""

    @abstractmethod
    def put(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    num_evictions = 0  # entries the store removed to stay within its own bound

    def writable(self) -> bool:
        """False for a few seconds after a failed write (a dead Redis, a full disk): write-through skips
        the store meanwhile instead of copying blocks that would only fail again."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class DiskStore(PersistentStore):
    """Files root/<last two hex digits of the key>/<key>: 256 directories. Crash-safe writes (temp file +
    rename).

    With max_bytes, the files stay within that many bytes: least recently used first out (an in-memory LRU
    index over the directory, built at start from the files' modification times; a read refreshes a file's
    time, so the order survives a restart). The bound is exact for one writing process per directory; several
    processes each keep their own index. A value bigger than the whole bound is written and removed at once
    (counted as an eviction), evicting nothing else.
    """

    name = "disk"

    def __init__(self, root: str | Path, retry_after_s: float = 5.0, max_bytes: int | None = None):
        self.root = Path(root)
        self.retry_after_s = retry_after_s
        self._write_down_until = 0.0
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"the disk store's byte bound must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        # key -> None, sized by the file; thread-safe (the writer and the fetch thread both touch it)
        self._lru: ByteLRU[str, None] | None = None
        self._refused = 0  # values bigger than max_bytes, removed as soon as written
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--kv-store disk:{root}: cannot create the directory: {e}") from None
        if max_bytes is not None:
            self._lru = ByteLRU(max_bytes, on_evict=lambda key, _: self._path(key).unlink(missing_ok=True))
            files = []
            for path in self.root.glob("*/kvserve-*"):
                try:
                    st = path.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, path.name, st.st_size))
            for _, key, size in sorted(files):  # oldest first: what does not fit is the least recently used
                self._index(key, size)

    @property
    def bytes_held(self) -> int:
        """Bytes of the files the index holds (max_bytes set), else 0: not tracked."""
        return self._lru.bytes_held if self._lru is not None else 0

    @property
    def num_evictions(self) -> int:
        """Files removed to stay within max_bytes."""
        return self._lru.num_evictions + self._refused if self._lru is not None else 0

    def _path(self, key: str) -> Path:
        return self.root / key[-2:] / key

    def _index(self, key: str, size: int) -> None:
        """A file of this size was written under key: make it the most recent, evicting LRU files for room."""
        assert self._lru is not None
        if not self._lru.put(key, None, size):
            self._lru.pop(key)
            self._path(key).unlink(missing_ok=True)
            self._refused += 1

    def get_prefix(self, keys: Sequence[str]) -> list[bytes]:
        out = []
        for key in keys:
            try:
                out.append(self._path(key).read_bytes())
            except FileNotFoundError:
                break
            except OSError as e:
                raise StoreUnavailable(f"disk read {key}: {e}") from e
            if self._lru is not None:
                self._lru.touch(key)
                with contextlib.suppress(OSError):
                    os.utime(self._path(key))  # recency for the next start's index
        return out

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self._write_down_until = time.monotonic() + self.retry_after_s
            raise StoreUnavailable(f"disk write {key}: {e}") from e
        if self._lru is not None:
            self._index(key, len(value))

    def writable(self) -> bool:
        return time.monotonic() >= self._write_down_until

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"disk delete {key}: {e}") from e
        if self._lru is not None:
            self._lru.pop(key)


class RedisStore(PersistentStore):
    """Blocks as Redis strings. Short timeouts; after a failure the store is skipped for retry_after_s."""

    name = "redis"

    def __init__(self, url: str, retry_after_s: float = 5.0, timeout_s: float = 2.0):
        import redis

        self.url = url
        self._client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._errors = (redis.RedisError, OSError)
        self.retry_after_s = retry_after_s
        self._down_until = 0.0

    def _call(self, what: str, fn, *args):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis {self.url} is down (retrying in a few seconds)")
        try:
            return fn(*args)
        except self._errors as e:
            self._down_until = time.monotonic() + self.retry_after_s
            raise StoreUnavailable(f"redis {what}: {e}") from e

    def get_prefix(self, keys: Sequence[str], batch: int = 64) -> list[bytes]:
        """MGET in batches of `batch` keys, stopping after the batch with the first missing key."""
        out: list[bytes] = []
        for i in range(0, len(keys), batch):
            for v in self._call("MGET", self._client.mget, list(keys[i : i + batch])):
                if v is None:
                    return out
                out.append(v)
        return out

    def put(self, key: str, value: bytes) -> None:
        self._call("SET", self._client.set, key, value)

    def writable(self) -> bool:
        return time.monotonic() >= self._down_until

    def delete(self, key: str) -> None:
        self._call("DEL", self._client.delete, key)

    def close(self) -> None:
        self._client.close()


def open_store(spec: str, max_bytes: int | None = None) -> PersistentStore:
    """`disk:PATH` (or a bare PATH) or `redis://HOST:PORT[/DB]` (also rediss:// and unix://). max_bytes bounds
    a disk store (Redis is bounded by its own maxmemory)."""
    kind = kv_store_kind(spec)
    if spec == "disk:":
        raise ValueError("--kv-store disk: needs a directory, e.g. disk:/var/cache/kvserve")
    if kind == "disk":
        return DiskStore(os.path.expanduser(spec.removeprefix("disk:")), max_bytes=max_bytes)
    if kind == "redis":
        if max_bytes is not None:
            raise ValueError("--kv-store-max-bytes bounds a disk store; bound Redis with its maxmemory setting")
        return RedisStore(spec)
    raise ValueError(f"--kv-store {spec!r}: use PATH, disk:PATH or redis://HOST:PORT")
