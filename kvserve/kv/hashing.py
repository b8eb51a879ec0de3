"""Content addresses of full KV blocks: a hash chain over (parent hash, token ids, extra keys).

A block's hash commits to every token before it, so equal hashes mean equal prefixes. The chain is SHA-256,
stable across processes and machines, so the same address can key a persistent store. The pool still compares
stored token ids on a hit, so even a collision could never serve the wrong KV.
Extra keys (a tenant's cache salt, ...) enter the first block's hash, so they separate whole chains.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.sha256()
    h.update(parent if parent is not None else b"\x00root")
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        h.update(b"\x00key")
        h.update(key.encode())
    return BlockHash(h.digest())


def hash_block_chain(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of token_ids from block index start_block on, chained from parent.

    Extra keys apply to block 0 only (they are then inherited through the chain). The same digests as
    hash_block block by block, with the token ids packed once (routers hash every prompt they route).
    """
    end = len(token_ids) // block_size
    if start_block >= end:
        return []
    packed = array("q", token_ids[start_block * block_size : end * block_size]).tobytes()
    width = 8 * block_size
    hashes: list[BlockHash] = []
    for i, b in enumerate(range(start_block, end)):
        h = hashlib.sha256(parent if parent is not None else b"\x00root")
        h.update(packed[i * width : (i + 1) * width])
        if b == 0:
            for key in extra_keys:
                h.update(b"\x00key")
                h.update(key.encode())
        parent = BlockHash(h.digest())
        hashes.append(parent)
    return hashes
