"""The torch attention path's CUDA prefill branch (one SDPA call per chunk) against its chunked CPU path.

The SDPA branch only runs on CUDA in the engine, but its code is device-agnostic, so it is checked here on
CPU: for a chunk starting at an offset over cached keys, both give the same attention up to rounding.
"""

from __future__ import annotations

import pytest
import torch

from kvserve.model.attention import AttentionMetadata, build_group, paged_attention


@pytest.mark.parametrize("start", [0, 150])  # a first chunk (plainly causal), a chunk over 150 cached tokens
def test_sdpa_prefill_chunk_matches_the_chunked_path(start):
    gen = torch.Generator().manual_seed(0)
    kvh, G, hd, bs, nb = 2, 3, 64, 16, 40
    kv = torch.randn(2, kvh, nb, bs, hd, generator=gen)
    table = list(range(39, 0, -2))  # 20 blocks, out of order: 320 keys
    n = 90
    q = torch.randn(n, kvh * G, hd, generator=gen)
    positions = [list(range(start, start + n))]
    outs = []
    for need_mask in (True, False):
        group = build_group(0, positions, [table], bs, G, torch.device("cpu"), need_mask)
        assert (group.masked is None) == (not need_mask)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.long), positions=torch.tensor(positions[0]), groups=[group]
        )
        outs.append(paged_attention(q, kv, meta, hd**-0.5))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    # brute force for one row: the last token sees keys 0..start+n-1
    keys = torch.stack([kv[:, :, table[p // bs], p % bs] for p in range(start + n)], dim=2)  # (2, kvh, L, hd)
    s = (q[-1, 0] @ keys[0, 0].T) * hd**-0.5
    torch.testing.assert_close(outs[1][-1, 0], torch.softmax(s, 0) @ keys[1, 0], atol=1e-5, rtol=1e-5)


def _brute(q_row, kv, table, bs, pos, lo, scale):
    """Attention of one query row (kv head 0, query head 0) over keys lo..pos, gathered key by key."""
    keys = torch.stack([kv[:, 0, table[p // bs], p % bs] for p in range(lo, pos + 1)], dim=1)  # (2, n, hd)
    return torch.softmax((q_row @ keys[0].T) * scale, 0) @ keys[1]


@pytest.mark.parametrize("window", [1, 40, 200])
def test_sliding_window_prefill_chunk(window):
    """A prefill chunk over cached keys with a sliding window: the chunked path (keys from the first chunk any
    row sees) and the SDPA branch agree, and a row sees exactly keys pos - window + 1 .. pos."""
    gen = torch.Generator().manual_seed(1)
    kvh, G, hd, bs, nb, start, n = 2, 3, 64, 16, 40, 150, 90
    kv = torch.randn(2, kvh, nb, bs, hd, generator=gen)
    table = list(range(39, 0, -2))
    q = torch.randn(n, kvh * G, hd, generator=gen)
    positions = [list(range(start, start + n))]
    outs = []
    for need_mask in (True, False):
        group = build_group(0, positions, [table], bs, G, torch.device("cpu"), need_mask, windows=(window,))
        meta = AttentionMetadata(torch.zeros(n, dtype=torch.long), torch.tensor(positions[0]), [group])
        outs.append(paged_attention(q, kv, meta, hd**-0.5, window=window))
    assert group.windows == {}  # the SDPA branch masks the window itself
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for row in (0, n - 1):
        pos = start + row
        ref = _brute(q[row, 0], kv, table, bs, pos, max(0, pos - window + 1), hd**-0.5)
        torch.testing.assert_close(outs[0][row, 0], ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_decodes_over_a_shared_prefix_are_batch_invariant():
    """Decodes sharing their first blocks (the group reads those once) under a 24-key window: each row gets the
    bits it gets alone, and the keys of its window only."""
    gen = torch.Generator().manual_seed(2)
    kvh, G, hd, bs, nb, window = 2, 2, 32, 16, 64, 24
    kv = torch.randn(2, kvh, nb, bs, hd, generator=gen)
    prefix = list(range(20))  # 320 shared keys
    tables = [prefix + [20 + 4 * b + i for i in range(4)] for b in range(4)]
    positions = [[330], [340], [300], [383]]
    q = torch.randn(4, kvh * G, hd, generator=gen)
    cpu = torch.device("cpu")

    def attend(rows):
        group = build_group(0, [positions[b] for b in rows], [tables[b] for b in rows], bs, G, cpu, windows=(window,))
        meta = AttentionMetadata(torch.zeros(len(rows), dtype=torch.long), torch.tensor(rows), [group])
        return group, paged_attention(q[rows], kv, meta, hd**-0.5, window=window)

    group, together = attend([0, 1, 2, 3])
    assert group.shared > 0 and group.windows[window].first_key > 0
    for b in range(4):
        assert torch.equal(attend([b])[1][0], together[b])
        pos = positions[b][0]
        ref = _brute(q[b, 0], kv, tables[b], bs, pos, pos - window + 1, hd**-0.5)
        torch.testing.assert_close(together[b, 0], ref, atol=1e-5, rtol=1e-5)
