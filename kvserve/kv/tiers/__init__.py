"""KV tiers below the fast pool: host RAM, then a persistent key-value store (local disk or Redis)."""

from kvserve.kv.tiers.manager import LoadedBlock, TieredCache, TierStats, model_fingerprint
from kvserve.kv.tiers.stores import DiskStore, HostTier, PersistentStore, RedisStore, StoreUnavailable, open_store

__all__ = [
    "DiskStore",
    "HostTier",
    "LoadedBlock",
    "PersistentStore",
    "RedisStore",
    "StoreUnavailable",
    "TierStats",
    "TieredCache",
    "model_fingerprint",
    "open_store",
]
