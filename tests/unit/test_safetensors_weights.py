"""kvserve's own safetensors reader (kvserve/model/safetensors_weights.py) against the safetensors library, and
take/fuse (kvserve/model/weights.py): stored dtypes kept, conversions exact, bad files refused by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from kvserve.model.safetensors_weights import SafetensorsWeights
from kvserve.model.weights import fuse, take

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.f16": torch.randn(3, 5, generator=gen).to(torch.float16),
        "c.f32": torch.randn(4, 5, generator=gen),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 5, dtype=torch.bfloat16),
        "g.scalar": torch.tensor(2.5),
        "model.rotary_emb.inv_freq": torch.ones(4),  # old checkpoints' buffer: skipped
    }
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_reads_equal_the_safetensors_library(shard):
    path, tensors = shard
    weights = SafetensorsWeights([path])
    assert set(weights) == set(tensors) - {"model.rotary_emb.inv_freq"}
    for name in weights:
        got = weights[name]
        assert got.dtype == tensors[name].dtype and got.shape == tensors[name].shape, name
        assert torch.equal(got, tensors[name]), name
        assert weights.shape(name) == tuple(tensors[name].shape) and weights.dtype(name) == tensors[name].dtype
    assert weights.nbytes() == sum(t.numel() * t.element_size() for n, t in tensors.items() if n in weights)


def test_take_and_fuse_convert_once(shard):
    path, tensors = shard
    weights = SafetensorsWeights([path])
    for dtype in (torch.float32, torch.bfloat16):
        out = take(weights, "a.bf16", dtype, torch.device("cpu"))
        assert out.dtype == dtype and torch.equal(out, tensors["a.bf16"].to(dtype))
        fused = fuse(weights, ["a.bf16", "b.f16", "c.f32", "f.empty"], dtype, torch.device("cpu"))
        parts = [tensors[n].to(dtype) for n in ("a.bf16", "b.f16", "c.f32", "f.empty")]
        assert torch.equal(fused, torch.cat(parts))
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse(weights, ["a.bf16", "d.i64"], torch.float32, torch.device("cpu"))


def test_reads_the_file_it_opened(shard):
    """A shard replaced after loading (a re-download) does not change the loaded model's weights."""
    path, tensors = shard
    weights = SafetensorsWeights([path])
    path.unlink()
    safetensors_torch.save_file({"a.bf16": torch.zeros(7, 5, dtype=torch.bfloat16)}, str(path))
    assert torch.equal(weights["a.bf16"], tensors["a.bf16"])


def _raw_file(path, header: object, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "do not fit"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not fit"),
        ({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype 'F8_E4M3'"),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_bad_headers_are_refused(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(ValueError, match=message):
        SafetensorsWeights([path])


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="header length"):
        SafetensorsWeights([path])
