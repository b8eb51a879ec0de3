"""KV tiers below the fast pool: host RAM, then a persistent key-value store (local disk or Redis).

The tiers reach the KV tensor only through a `BlockIO` (block_io.py; the torch one is
kvserve/model/block_io.py), so nothing in this package imports torch.
"""

from kvserve.kv.tiers.block_io import BlockIO, BlockLayout
from kvserve.kv.tiers.manager import LoadedBlock, TieredCache
from kvserve.kv.tiers.stores import DiskStore, HostTier, PersistentStore, RedisStore, StoreUnavailable, open_store

__all__ = [
    "BlockIO",
    "BlockLayout",
    "DiskStore",
    "HostTier",
    "LoadedBlock",
    "PersistentStore",
    "RedisStore",
    "StoreUnavailable",
    "TieredCache",
    "open_store",
]
