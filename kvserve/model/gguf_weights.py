"""A GGUF file's tensors as :class:`WeightFiles` under Hugging Face names and layout, read on demand.

Float tensors (F32, F16, BF16) come back in their stored dtype; quantized ones (Q4_1, Q8_0, ...) are
dequantized to float32, or, through :meth:`GGUFWeights.quantized`, handed over as their raw blocks for the
linear kernel to run as stored (kvserve/model/quant.py). A tensor is read with ``pread`` and dequantized a
band of rows at a time straight into the tensor the model keeps, so loading holds the model's weights plus
one band (about 16 MiB of float32), not a float32 copy of every tensor: ``GGUFReader`` memory-maps the
file, and the pages a read through that map touches would stay resident for as long as the reader lives.
llama.cpp stores Llama's q/k rows with each head's two rotary halves interleaved; each band (whole heads) is
put back in HF order.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvserve.model.config import ModelConfig
from kvserve.model.quant import QuantTensor, native_types
from kvserve.model.weights import WeightFiles

# GGUF per-layer tensor name -> Hugging Face name (suffix after "model.layers.{i}.")
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_BAND_ELEMENTS = 4 << 20  # rows dequantized at once: 16 MiB of float32


class GGUFWeights(WeightFiles):
    """The tensors listed by a ``gguf.GGUFReader`` of ``path``, read through one descriptor of that file."""

    def __init__(self, path: Path, reader: Any, config: ModelConfig) -> None:
        from gguf import GGMLQuantizationType as Q

        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._float = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
        self._tensors: dict[str, tuple[Any, int, int]] = {}  # hf name -> (tensor type, offset, q/k heads)
        shapes, dtypes = {}, {}
        for tensor in reader.tensors:
            name = gguf_to_hf_name(tensor.name)
            heads = 0
            if config.architecture == "llama" and ".self_attn.q_proj." in name:
                heads = config.num_attention_heads
            elif config.architecture == "llama" and ".self_attn.k_proj." in name:
                heads = config.num_key_value_heads
            shapes[name] = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims fastest-first
            dtypes[name] = self._float.get(tensor.tensor_type, torch.float32)
            self._tensors[name] = (tensor.tensor_type, int(tensor.data_offset), heads)
        super().__init__(shapes, dtypes)

    def read(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        kind, offset, heads = self._tensors[name]
        shape = self.shape(name)
        if len(shape) < 2:  # a norm or bias, read whole (q/k biases are permuted like the weights' rows)
            values = self._band(kind, offset, _row_bytes(kind, shape[0]), 0, 1).reshape(shape)
            out.copy_(unpermute_qk(values, heads) if heads else values)
            return
        rows, row_elems = shape[0], int(np.prod(shape[1:]))
        row_bytes = _row_bytes(kind, row_elems)
        unit = rows // heads if heads else 1  # bands hold whole heads, so each can be un-permuted alone
        band = max(unit, _BAND_ELEMENTS // max(row_elems, 1) // unit * unit)
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            values = self._band(kind, offset, row_bytes, start, stop).reshape(stop - start, *shape[1:])
            out[start:stop].copy_(unpermute_qk(values, (stop - start) // unit) if heads else values)

    @property
    def has_quantized(self) -> bool:
        """Whether any tensor is stored in a type the linear kernel runs as stored."""
        return any(kind in native_types() for kind, _, _ in self._tensors.values())

    def quantized(self, name: str) -> QuantTensor | None:
        kind, offset, heads = self._tensors[name]
        shape = self.shape(name)
        if kind not in native_types() or len(shape) != 2:
            return None
        rows, row_bytes = shape[0], _row_bytes(kind, shape[1])
        raw = np.empty((rows, row_bytes), dtype=np.uint8)
        _pread_exact(self._fd, raw, offset)
        if heads:  # whole rows of blocks: un-permuting rows needs no decoding
            raw = unpermute_qk(torch.from_numpy(raw), heads).numpy()
        return QuantTensor(np.ascontiguousarray(raw), kind, (rows, shape[1]))

    def _band(self, kind: Any, offset: int, row_bytes: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (stop - start, values per row): stored float dtype, else dequantized float32."""
        from gguf.quants import dequantize

        raw = np.empty((stop - start, row_bytes), dtype=np.uint8)
        _pread_exact(self._fd, raw, offset + start * row_bytes)
        if kind in self._float:
            return torch.from_numpy(raw).view(self._float[kind])
        return torch.from_numpy(dequantize(raw, kind))


def _row_bytes(kind: Any, elems: int) -> int:
    """Bytes of ``elems`` consecutive values of a GGML type (whole quantization blocks)."""
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[kind]
    if elems % block:
        raise ValueError(f"GGUF tensor rows of {elems} values do not fill {kind.name} blocks of {block}")
    return elems // block * type_size


def _pread_exact(fd: int, out: np.ndarray, offset: int) -> None:
    view, done = memoryview(out).cast("B"), 0
    while done < out.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError("the GGUF file ended early (truncated since it was opened?)")
        done += got


def gguf_to_hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3...``)."""
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is not None and match.group(2) in GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (no Hugging Face Llama equivalent)")


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's ``permute`` on Llama q/k rows (weights or biases).

    llama.cpp interleaves the two rotary halves of each head (``(heads, 2, d/2)`` ->
    ``(heads, d/2, 2)``); this restores Hugging Face's half-split order.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    split = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)
