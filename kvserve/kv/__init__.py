"""Paged KV memory: block hashing, the block pool with its prefix index, and the per-request cache manager.

Nothing in this package imports torch: it manages block ids, not tensors.
"""
