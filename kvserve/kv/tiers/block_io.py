"""BlockIO: how KV bytes leave and re-enter the fast pool, the one thing the tiers need from the tensor side.

The tiers (manager.py) never touch the KV tensor: they ask a BlockIO to read pool blocks out as payloads,
opaque values in host memory (the torch implementation, kvserve/model/block_io.py, hands out CPU tensors),
and to write payloads back into pool blocks. The host-RAM tier keeps payloads as they are, so a hit there is
one copy back; a persistent store needs bytes, which `to_bytes` / `from_bytes` give, framed and verified
by codec.py against the `layout`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Payload = Any  # one block's KV in host memory, in the BlockIO's own representation


@dataclass(frozen=True)
class BlockLayout:
    """What one block's KV bytes mean: stored with every persistent value and checked on read."""

    dtype: str  # e.g. "bfloat16" (torch's name without "torch.")
    shape: tuple[int, ...]  # (layers, 2, kv_heads, block_size, head_dim)
    itemsize: int  # bytes per element

    @property
    def nbytes(self) -> int:
        """Bytes of one block's KV."""
        return math.prod(self.shape) * self.itemsize


class BlockIO(ABC):
    """Moves whole KV blocks between the pool and host memory. Block ids are pool block ids.

    Contract: `write([b], [p])` after `p = read([a])[0]` makes block b hold exactly the bytes block a held
    (bit for bit), and `from_bytes(to_bytes(p))` is a payload equal to p. Payloads handed out by `read`
    own their memory: later pool writes do not change them.
    """

    @property
    @abstractmethod
    def layout(self) -> BlockLayout:
        """The layout of every block of this pool."""

    @abstractmethod
    def read(self, block_ids: Sequence[int]) -> list[Payload]:
        """The KV of these blocks as host payloads, same order: one gather and one copy to host memory for
        all of them (on a GPU, one transfer)."""

    @abstractmethod
    def write(self, block_ids: Sequence[int], payloads: Sequence[Payload]) -> None:
        """Copy payloads into these pool blocks (same order); done when it returns."""

    @abstractmethod
    def to_bytes(self, payload: Payload) -> bytes | memoryview:
        """The payload's raw bytes (layout.nbytes of them, in the layout's element order)."""

    @abstractmethod
    def from_bytes(self, data: bytes | memoryview) -> Payload:
        """A payload from raw bytes of this layout (already verified: exactly layout.nbytes of them)."""

    @abstractmethod
    def nbytes(self, payload: Payload) -> int:
        """Bytes of host memory the payload holds (what the host tier's budget counts)."""
