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
