"""The fused CPU attention kernel (kvserve/model/native.py) against brute force, and its batch invariance.

Brute force: for every query row, softmax(q . K[0..p]) . V[0..p] in float64 over the keys gathered by hand
through the block table. Invariance: a row's bits must not change with the other sequences in the call, with
how its sequence's tokens are split into calls (chunked prefill, decode), or with where its blocks live.
"""

from __future__ import annotations

import pytest
import torch

from kvserve.model import native
from tests.conftest import require_native


def test_kernel_builds_where_a_c_compiler_is_installed():
    """A build failure falls back to the slower torch path with a warning; here (CI) it must not happen."""
    require_native()  # fails under CI without a compiler or with a failed build
    assert native.load() is not None


needs_kernel = pytest.mark.usefixtures("native_kernels")


def _cache(kvh: int, nb: int, bs: int, hd: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, kvh, nb, bs, hd, generator=gen) * 2).to(dtype)


def _call(q, kv, seqs, scale):
    """seqs: list of (block table, first position, number of tokens); q rows in that order."""
    positions = torch.tensor([p for _, start, n in seqs for p in range(start, start + n)], dtype=torch.long)
    meta = native.build_meta([list(t) for t, _, _ in seqs], [n for _, _, n in seqs], positions, q.device)
    return native.paged_attention(q, kv, meta, scale)


def _brute(q, kv, table, start, n, scale):
    """(n, H, hd) float64 reference for tokens start..start+n-1 of one sequence."""
    _, kvh, _, bs, hd = kv.shape
    H = q.shape[1]
    G = H // kvh
    keys = torch.stack([kv[0, :, table[p // bs], p % bs] for p in range(start + n)], dim=1).double()  # kvh, L, hd
    vals = torch.stack([kv[1, :, table[p // bs], p % bs] for p in range(start + n)], dim=1).double()
    out = torch.empty(n, H, hd, dtype=torch.float64)
    for t in range(n):
        p = start + t
        for h in range(H):
            s = (q[t, h].double() * scale) @ keys[h // G, : p + 1].T
            out[t, h] = torch.softmax(s, dim=0) @ vals[h // G, : p + 1]
    return out


@needs_kernel
@pytest.mark.parametrize(
    ("dtype", "kvh", "G", "hd", "bs"),
    [
        (torch.float32, 3, 3, 64, 16),
        (torch.bfloat16, 3, 3, 64, 16),
        (torch.float32, 2, 2, 128, 8),
        (torch.bfloat16, 1, 4, 32, 256),
    ],
)
def test_matches_brute_force(dtype, kvh, G, hd, bs):
    gen = torch.Generator().manual_seed(1)
    nb = 64
    kv = _cache(kvh, nb, bs, hd, dtype, seed=2)
    perm = torch.randperm(nb, generator=gen).tolist()
    seqs = [(perm[:20], 0, 37), (perm[20:40], 50, 1), (perm[40:], 3, 18)]  # prefill, decode, mid-prompt chunk
    seqs = [(t, s, n) for t, s, n in seqs if (s + n - 1) // bs < len(t)]
    T = sum(n for _, _, n in seqs)
    q = torch.randn(T, kvh * G, hd, generator=gen).to(dtype)
    scale = hd**-0.5
    out = _call(q, kv, seqs, scale)
    assert out.shape == q.shape and out.dtype == dtype
    row = 0
    for table, start, n in seqs:
        ref = _brute(q[row : row + n].float(), kv, table, start, n, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[row : row + n].double(), ref, atol=tol, rtol=tol)
        row += n


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_batch_chunking_or_block_placement(dtype):
    kvh, G, hd, bs, nb = 3, 3, 64, 16, 96
    gen = torch.Generator().manual_seed(3)
    kv = _cache(kvh, nb, bs, hd, dtype, seed=4)
    table = list(range(0, 20))
    n = 300  # one sequence's 300 tokens
    q = torch.randn(n, kvh * G, hd, generator=gen).to(dtype)
    scale = hd**-0.5
    whole = _call(q, kv, [(table, 0, n)], scale)
    # the same tokens in chunks of 1, 7 and 100 tokens (decode steps, odd tiles, chunked prefill)
    for chunk in (1, 7, 100):
        parts = [_call(q[s : s + chunk], kv, [(table, s, min(chunk, n - s))], scale) for s in range(0, n, chunk)]
        assert torch.equal(torch.cat(parts), whole), chunk
    # inside a batch with other sequences, before and after it
    other_q = torch.randn(40, kvh * G, hd, generator=gen).to(dtype)
    batched = _call(
        torch.cat([other_q[:30], q, other_q[30:]]),
        kv,
        [(list(range(20, 40)), 10, 30), (table, 0, n), (list(range(40, 60)), 200, 10)],
        scale,
    )
    assert torch.equal(batched[30 : 30 + n], whole)
    # the same keys and values copied into other blocks
    moved = kv.clone()
    new_table = list(range(95, 75, -1))
    moved[:, :, new_table] = kv[:, :, table]
    assert torch.equal(_call(q, moved, [(new_table, 0, n)], scale), whole)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [16, 32])
def test_sequences_sharing_blocks_get_the_bits_they_get_alone(dtype, bs):
    """Decodes (and short suffixes) whose block tables share a prefix are attended together, each shared key
    block loaded once for all of them (cascade attention): every row must keep its bits alone, and match brute
    force. Covers: a deep shared prefix, sharers that diverge at different depths (mid-block and at an odd
    16-key block), a sequence sharing only its first block, one sharing nothing, and more sharers than one
    work item holds."""
    kvh, G, hd, nb = 3, 3, 64, 400
    gen = torch.Generator().manual_seed(5)
    kv = _cache(kvh, nb, bs, hd, dtype, seed=6)
    prefix = list(range(0, 2048 // bs))  # 2,048 shared keys
    tail = iter(range(len(prefix), nb))
    seqs = []
    for i in range(40):  # 40 sharers of the whole prefix, each with one block of its own: decodes at 2,048 + i % 9
        seqs.append((prefix + [next(tail)], 2048 + i % 9, 1))
    cut = 1000 // bs  # shares 1,000 // bs blocks, then its own
    seqs.append((prefix[:cut] + [next(tail) for _ in range(len(prefix) - cut + 1)], 2050, 1))
    seqs.append((prefix[:1] + [next(tail) for _ in range(10)], 100, 1))  # the first block only
    seqs.append(([next(tail) for _ in range(8)], 120, 1))  # nothing shared
    seqs.append((prefix + [next(tail)], 2040, 12))  # a short suffix, ending inside the last shared block
    T = sum(n for _, _, n in seqs)
    q = torch.randn(T, kvh * G, hd, generator=gen).to(dtype)
    scale = hd**-0.5
    together = _call(q, kv, seqs, scale)
    row = 0
    for i, (table, start, n) in enumerate(seqs):
        alone = _call(q[row : row + n], kv, [(table, start, n)], scale)
        assert torch.equal(together[row : row + n], alone), i
        if i % 10 == 0 or i >= 40:
            ref = _brute(q[row : row + n].float(), kv, table, start, n, scale)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(alone.double(), ref, atol=tol, rtol=tol)
        row += n
    # the same batch in another order: the groups and their leaders change, no row's bits do
    perm = list(range(len(seqs)))[::-1]
    rows = [list(range(sum(n for _, _, n in seqs[:i]), sum(n for _, _, n in seqs[: i + 1]))) for i in range(len(seqs))]
    order = [r for i in perm for r in rows[i]]
    flipped = _call(q[order], kv, [seqs[i] for i in perm], scale)
    assert torch.equal(flipped, together[order])


def test_a_failed_build_falls_back_to_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.delenv("KVSERVE_ATTENTION", raising=False)
    native.load.cache_clear()
    try:
        assert native.load() is None
        assert not native.enabled(torch.device("cpu"), torch.float32)
        assert not native.linear_enabled(torch.device("cpu"), torch.float32)  # linears fall back to oneDNN
        assert "torch path" in caplog.text
        assert not list(tmp_path.glob("*.so"))
    finally:
        native.load.cache_clear()
