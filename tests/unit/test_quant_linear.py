"""Quantized GGUF panels on the linear kernel (csrc/linear.c, kvserve/model/quant.py) against the reference:
gguf-py's dequantizer, its float32 weights (cast to the dtype) run by the plain packed kernel.

Bitwise: a quantized linear must give a row the same bits as the dequantized model's linear, at every row
count (the register path up to 4 rows, the scratch path above), with bias and residual, in the SwiGLU pack,
for fused tensors of different types, in float32 and bfloat16; embedding rows equal the dequantized table's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve.model import native, quant

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(
    not native.kernel_linear_available(torch.device("cpu"), torch.float32), reason="needs the AVX-512 linear kernel"
)
DTYPES = [torch.float32] + (
    [torch.bfloat16] if native.kernel_linear_available(torch.device("cpu"), torch.bfloat16) else []
)
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


def random_blocks(kind, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Well-formed raw blocks: quantized random weights where gguf-py quantizes the type, else random bytes
    with small positive float16 super-scales (gguf-py only dequantizes the K-quants)."""
    if kind in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return gguf.quants.quantize((rng.standard_normal((rows, k)) * 0.05).astype(np.float32), kind)
    size = gguf.constants.GGML_QUANT_SIZES[kind][1]
    raw = rng.integers(0, 256, size=(rows, k // 256 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scales = (0, 2) if kind == Q.Q4_K else (208,)  # d and dmin of Q4_K, d of Q6_K (at the block's end)
    for col in scales:
        d = rng.uniform(1e-4, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, col : col + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def tensor(kind, rows: int, k: int, seed: int = 0) -> quant.QuantTensor:
    return quant.QuantTensor(random_blocks(kind, rows, k, np.random.default_rng(seed)), kind, (rows, k))


@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
def test_decode_is_gguf_dequantize(kind):
    """S * q (+ B) in float32, per group, equals gguf-py's dequantized values bit for bit."""
    t = tensor(kind, 50, 512, seed=1)
    d = quant.decode(t)
    q = d.codes.astype(np.float32) - (d.fmt.offset if d.fmt.bits == 4 else 0)
    s = np.repeat(d.scales, d.fmt.group, axis=1)
    w = s * q
    if d.bias is not None:
        w = w + np.repeat(d.bias, d.fmt.group, axis=1)
    ref = t.dequantize().numpy()
    assert np.array_equal(w.view(np.uint32), ref.view(np.uint32))


def _check(parts, dtype, rows, swiglu=False, bias=False, residual=False, seed=0):
    ref_w = torch.cat([p.dequantize() for p in parts]).to(dtype)
    ql, pl = native.QuantLinear(parts, dtype, swiglu), native.PackedLinear(ref_w, swiglu)
    gen = torch.Generator().manual_seed(seed)
    n, k = ref_w.shape
    x = torch.randn(rows, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    r = torch.randn(rows, n, generator=gen).to(dtype) if residual else None
    got, want = ql(x, b, r), pl(x, b, r)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want), f"{rows} rows: max |diff| {(got.float() - want.float()).abs().max()}"
    return ql, ref_w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", TYPES, ids=lambda t: t.name)
def test_linear_bitwise_equals_dequantized(kind, dtype):
    parts = [tensor(kind, 100, 512)]
    for rows in (1, 2, 3, 4, 5, 8, 33, 300):  # registers up to 4 rows, scratch panels above, two row blocks
        _check(parts, dtype, rows, bias=rows % 2 == 1, residual=rows > 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q4_0, Q.Q4_1), (Q.Q8_0, Q.Q4_1), (Q.Q4_1, Q.Q4_K)])
def test_fused_mixed_types(kinds, dtype):
    """q/k/v of different types (a Q4_K_M file's v in Q6_K) fused into one linear, in their joined format."""
    parts = [tensor(kind, rows, 256, seed=i) for i, (kind, rows) in enumerate(zip(kinds, (64, 32, 40)))]
    for rows in (1, 4, 9):
        _check(parts, dtype, rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_swiglu_pack(kind, dtype):
    """[gate; up] packed for the SwiGLU epilogue: the activation of the dequantized pack, bit for bit; 60
    features do not fill the last panel."""
    parts = [tensor(kind, 60, 256, seed=1), tensor(kind, 60, 256, seed=2)]
    for rows in (1, 3, 6, 70):
        _check(parts, dtype, rows, swiglu=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_rows(dtype):
    ql = native.QuantLinear([tensor(Q.Q8_0, 130, 256)], dtype)
    ref = tensor(Q.Q8_0, 130, 256).dequantize().to(dtype)
    ids = torch.tensor([0, 47, 48, 129, 5, 5])
    assert torch.equal(ql.rows(ids), ref[ids])
    with pytest.raises(IndexError):
        ql.rows(torch.tensor([130]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(TYPES),
    n=st.integers(1, 120),
    groups=st.integers(1, 3),
    rows=st.integers(1, 12),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape(kind, n, groups, rows, bf16, seed):
    """Any output count (partial last panel), K any multiple of the block, any rows: the reference's bits."""
    dtype = torch.bfloat16 if bf16 and torch.bfloat16 in DTYPES else torch.float32
    _check([tensor(kind, n, 256 * groups, seed)], dtype, rows, bias=seed % 2 == 0, residual=seed % 3 == 0, seed=seed)


def test_pack_memory_is_the_file():
    """Q8_0/Q4_0/Q4_1 panels take the file's bytes (96 rows: whole panels); the K-quants' float32 scales cost
    0.75 (Q4_K) and 1.25 (Q6_K) bytes per weight."""
    for kind, per_weight in ((Q.Q4_1, 20 / 32), (Q.Q8_0, 34 / 32), (Q.Q4_0, 18 / 32), (Q.Q4_K, 0.75), (Q.Q6_K, 1.25)):
        t = tensor(kind, 96, 512)
        ql = native.QuantLinear([t], torch.float32)
        assert ql.packed.numel() == 96 * 512 * per_weight
        if kind in (Q.Q4_1, Q.Q8_0, Q.Q4_0):
            assert ql.packed.numel() == t.raw.nbytes
