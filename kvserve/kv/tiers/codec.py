"""The byte format of one KV block in a persistent store: self-describing, checksummed, verified on read.

    b"KVSB" | version u8 | 3 zero bytes | blake2b-128 digest of everything after it | meta length u32 |
    meta (JSON: dtype, shape) | number of tokens u32 | token ids (int32) | KV payload (the block's raw bytes)

A value that is truncated, has a wrong digest, another dtype/shape than this engine's blocks, or tokens other
than the ones the request has is rejected (`CorruptEntry`), so the caller recomputes; nothing unverified is
ever served. Works on bytes and a `BlockLayout` only: turning the payload into a tensor is the BlockIO's job.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

from kvserve.kv.tiers.block_io import BlockLayout

MAGIC = b"KVSB"
VERSION = 2  # 2: KV block laid out (layers, 2, kv_heads, block_size, head_dim); 1 had heads after tokens
_HEAD = struct.Struct("<4sB3s16sI")  # magic, version, zero padding, digest, meta length


class CorruptEntry(ValueError):
    """A stored value failed verification."""


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


def encode_block(token_ids: Sequence[int], payload: bytes | memoryview, layout: BlockLayout) -> bytes:
    """payload: one block's raw KV bytes, laid out as `layout` says (BlockIO.to_bytes)."""
    if memoryview(payload).nbytes != layout.nbytes:
        raise ValueError(f"payload has {memoryview(payload).nbytes} bytes, layout {layout} has {layout.nbytes}")
    meta = json.dumps({"dtype": layout.dtype, "shape": list(layout.shape)}).encode()
    tokens = struct.pack(f"<{len(token_ids)}i", *token_ids)
    meta_tokens = struct.pack("<I", len(meta)) + meta + struct.pack("<I", len(token_ids)) + tokens
    return _HEAD.pack(MAGIC, VERSION, bytes(3), _digest(meta_tokens, payload), len(meta)) + meta_tokens[4:] + payload


def decode_block(value: bytes, token_ids: Sequence[int], layout: BlockLayout) -> memoryview:
    """The block's raw KV bytes (a view into value), after checking everything; raises CorruptEntry."""
    if len(value) < _HEAD.size:
        raise CorruptEntry("truncated header")
    magic, version, pad, digest, meta_len = _HEAD.unpack_from(value)
    if magic != MAGIC or version != VERSION or pad != bytes(3):
        raise CorruptEntry(f"bad header {magic!r}/{version}/{pad!r}")
    rest = memoryview(value)[_HEAD.size :]
    if len(rest) < meta_len + 4:
        raise CorruptEntry("truncated meta")
    meta_b = bytes(rest[:meta_len])
    (n_tokens,) = struct.unpack_from("<I", rest, meta_len)
    tok_end = meta_len + 4 + 4 * n_tokens
    if len(rest) < tok_end:
        raise CorruptEntry("truncated token ids")
    payload = rest[tok_end:]
    if _digest(struct.pack("<I", meta_len) + bytes(rest[:tok_end]), payload) != digest:
        raise CorruptEntry("checksum mismatch")
    try:
        meta = json.loads(meta_b)
    except ValueError as e:
        raise CorruptEntry(f"bad meta: {e}") from None
    if meta.get("dtype") != layout.dtype or meta.get("shape") != list(layout.shape):
        raise CorruptEntry(f"layout {meta} is not {layout.dtype} {list(layout.shape)}")
    stored = struct.unpack_from(f"<{n_tokens}i", rest, meta_len + 4)
    if tuple(stored) != tuple(token_ids):
        raise CorruptEntry("token ids differ (hash collision or foreign entry)")
    if len(payload) != layout.nbytes:
        raise CorruptEntry(f"payload has {len(payload)} bytes, expected {layout.nbytes}")
    return payload
