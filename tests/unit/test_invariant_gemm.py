"""The GEMM rules kvserve's batch invariance rests on (kvserve/model/invariant.py), checked on this torch build.

A row of x @ W^T must come out bit-identical whatever else is in the call: any row count, any offset.
The reference is the same row inside one large call; shapes are the bundled model's fused weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.model.invariant import (
    invariant_rows,
    linear,
    onednn_rows_invariant,
    prepack_linear_weight,
    uses_onednn,
)
from tests.conftest import require_component, require_machine

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down of SmolLM2-135M
ROW_COUNTS = [1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 16, 31, 33, 64, 127, 129, 300, 513]


def require_rows_invariant(dtype: torch.dtype) -> None:
    """With AMX, oneDNN's bfloat16 rows depend on the row count (model/invariant.py); the engine refuses that
    backend there (tests/unit/test_backends.py), so the rule is checked where it holds."""
    if not onednn_rows_invariant(dtype):
        pytest.skip(f"this CPU's oneDNN {dtype} linear is not row-invariant (AMX); the engine runs kvserve's kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_rows_do_not_depend_on_the_row_count(dtype, shape):
    require_rows_invariant(dtype)
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    x = torch.randn(700, in_f, generator=gen).to(dtype)
    for b in (None, bias):
        ref = linear(x, w, b)
        assert ref.shape == (700, out_f) and ref.dtype == dtype
        for m in ROW_COUNTS:
            # many starts for small calls: in bfloat16 a different summation order only shows where an output
            # rounds the other way (unpadded one-row calls: about 1 row in 10 with K = 1,536)
            for start in range(0, 700 - m, 3 if m <= 5 else 97):
                got = linear(x[start : start + m], w, b)
                assert torch.equal(got, ref[start : start + m]), (dtype, shape, m, start, b is not None)
        # and it is the same product F.linear computes, up to rounding
        tol = 1e-4 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(ref.float(), F.linear(x, w, b).float(), atol=tol, rtol=tol)


def test_float32_and_bfloat16_linears_use_onednn_here():
    """The speed the README reports assumes oneDNN; a torch build without it falls back to F.linear + padding."""
    assert uses_onednn(torch.float32) == torch.backends.mkldnn.is_available()
    assert not uses_onednn(torch.float16) or torch.ops.mkldnn._is_mkldnn_fp16_supported()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_plain_weights_bits_at_every_row_count(dtype):
    require_component(torch.backends.mkldnn.is_available(), "oneDNN in torch", "make test installs torch's CPU wheel")
    require_machine(uses_onednn(dtype), "the instructions of oneDNN's bfloat16 linear (AVX-512 BW/VL/DQ or AMX)")
    require_rows_invariant(dtype)
    gen = torch.Generator().manual_seed(2)
    for out_f, in_f in SHAPES + [(4096, 576)]:
        w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
        bias = torch.randn(out_f, generator=gen).to(dtype)
        packed = prepack_linear_weight(w)
        assert packed.is_mkldnn and packed.shape == w.shape
        x = torch.randn(600, in_f, generator=gen).to(dtype)
        for b in (None, bias):
            ref = linear(x, w, b)
            assert torch.equal(linear(x, packed, b), ref)
            for m in (1, 2, 3, 7, 16, 33):
                for start in range(0, 600 - m, 7 if m <= 3 else 61):
                    assert torch.equal(linear(x[start : start + m], packed, b), ref[start : start + m]), (m, start)
        assert linear(x[:0], packed).shape == (0, out_f)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 11, 12, 13, 40])
def test_mkl_matmul_rows_padded_by_invariant_rows_match_a_large_batch(m):
    """The attention's batched torch.matmul in float32 follows invariant_rows' padding rule."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 64, 64, generator=gen)
    k = torch.randn(3, 2, 64, 128, generator=gen)
    ref = torch.matmul(q, k)
    mp = invariant_rows(m, torch.float32)
    assert mp >= m and (mp >= 12 or mp % 4 == 0)
    got = torch.matmul(q[:, :, :mp], k)[:, :, :m]
    assert torch.equal(got, ref[:, :, :m])
