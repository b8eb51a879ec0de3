"""Paged KV memory: block hashing, the block pool with its prefix index, the per-request cache manager, and
the tiers below the pool (host RAM, disk, Redis).

Nothing in this package imports torch: it manages block ids and bytes, not tensors. The tiers move KV through
a `BlockIO` (kv/tiers/block_io.py) that kvserve/model implements; tests/unit/test_torch_free.py holds it to it.
"""
