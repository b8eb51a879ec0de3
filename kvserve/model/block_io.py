"""TorchBlockIO: the BlockIO (kvserve/kv/tiers/block_io.py) of the engine's one preallocated KV tensor.

    kv_cache  (layers, 2, kv_heads, blocks, block_size, head_dim), on the model's device
    payload   (layers, 2, kv_heads, block_size, head_dim), a CPU tensor of the cache's dtype

The tiers see payloads as opaque values; the host-RAM tier holds these CPU tensors as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.kv.tiers.block_io import BlockIO, BlockLayout


class TorchBlockIO(BlockIO):
    """Reads and writes blocks of one KV tensor; payloads are CPU tensors."""

    def __init__(self, kv_cache: torch.Tensor):
        self.kv_cache = kv_cache  # (layers, 2, kv_heads, blocks, block_size, head_dim)
        shape = tuple(kv_cache.shape)
        self._layout = BlockLayout(
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            shape=(*shape[:3], *shape[4:]),
            itemsize=kv_cache.element_size(),
        )

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    def read(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        if not block_ids:
            return []
        if len(block_ids) == 1:  # one block: a slice copied straight to the host, no gather
            return [self.kv_cache[:, :, :, block_ids[0]].to("cpu", copy=True)]
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        kv = self.kv_cache.index_select(3, ids).to("cpu")  # (layers, 2, kv_heads, n, block_size, head_dim)
        return [kv[:, :, :, i] for i in range(len(block_ids))]

    def write(self, block_ids: Sequence[int], payloads: Sequence[torch.Tensor]) -> None:
        for bid, kv in zip(block_ids, payloads, strict=True):
            self.kv_cache[:, :, :, bid].copy_(kv, non_blocking=False)

    def to_bytes(self, payload: torch.Tensor) -> memoryview:
        return payload.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy().data

    def from_bytes(self, data: bytes | memoryview) -> torch.Tensor:
        dtype = self.kv_cache.dtype
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(self._layout.shape)

    def nbytes(self, payload: torch.Tensor) -> int:
        return payload.nbytes
