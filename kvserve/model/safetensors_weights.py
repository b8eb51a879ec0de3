"""A Hugging Face folder's ``*.safetensors`` shards as :class:`WeightFiles`: each tensor read on demand, in
the dtype it is stored in (bf16/fp16 stay bf16/fp16), straight into the tensor the model keeps.

Why not ``safetensors.safe_open``: it memory-maps the whole shard, and every page a read touches stays in
the process's resident set until the handle closes, so a bf16 engine on a bf16 folder would peak at the
weights twice (the mapped file plus the engine's copies). Reading with ``pread`` into the destination costs
no mapping, and when the engine dtype is the stored dtype the bytes land in the engine's tensor directly.
The format is small and fixed (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the data; the header is checked
against the file before anything is read. Each shard stays open (one descriptor) while the weights live,
so later reads see the files that were checked, even if the folder is replaced meanwhile.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import weakref
from pathlib import Path

import torch

from kvserve.model.weights import WeightFiles

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved; recomputed by us


class SafetensorsWeights(WeightFiles):
    """Every tensor of ``shards`` (later shards win on a repeated name), read lazily by ``pread``."""

    def __init__(self, shards: list[Path]) -> None:
        if sys.byteorder != "little":
            raise ValueError("safetensors files are little-endian; this machine is not")
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for shard in shards:
            fd = os.open(shard, os.O_RDONLY)
            weakref.finalize(self, os.close, fd)
            for name, (dtype, shape, offset, nbytes) in _read_header(fd, shard).items():
                if not name.endswith(_SKIPPED_SUFFIXES):
                    self._where[name] = (fd, offset, nbytes)
                    shapes[name], dtypes[name] = shape, dtype
        super().__init__(shapes, dtypes)

    def read(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        self._pread_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        if out.device.type == "cpu" and out.dtype == self.dtype(name) and out.is_contiguous():
            self._pread_into(name, out)  # no staging: the file's bytes are the engine's tensor
        else:
            out.copy_(self.read(name).view(out.shape))  # one stored-dtype buffer, converted while copied

    def _pread_into(self, name: str, out: torch.Tensor) -> None:
        fd, offset, nbytes = self._where[name]
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        done = 0
        while done < nbytes:  # Linux returns at most ~2 GiB per call
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{name}: the safetensors file ended early (truncated since it was opened?)")
            done += got


def _read_header(fd: int, path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute offset, nbytes), checked against the file's size."""
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: not a safetensors file (header length {header_len} past the file's end)")
    try:
        header = json.loads(os.pread(fd, header_len, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(_DTYPES)}")
        numel = 1
        for dim in shape:
            numel *= dim
        if not (0 <= begin <= end <= data_len) or end - begin != numel * dtype.itemsize or min(shape, default=0) < 0:
            raise ValueError(f"{path}: tensor {name!r} offsets {[begin, end]} do not fit {dtype_name}{list(shape)}")
        tensors[name] = (dtype, shape, data_start + begin, end - begin)
    return tensors
