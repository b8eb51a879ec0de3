"""The torch attention path's CUDA prefill branch (kvserve/model/attention.py): one SDPA call per chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvserve.model.attention import AttentionGroup


def sdpa_chunk(
    q: torch.Tensor, kv_layer: torch.Tensor, g: AttentionGroup, scale: float, window: int | None = None
) -> torch.Tensor:
    """One sequence's prefill chunk on CUDA: torch's fused SDPA over its gathered keys, causal from its offset.

    CUDA makes no batch-invariance claim (README), so a chunk takes the library kernel in one call instead of
    QUERY_TILE-row tiles of chunked GEMMs (which keep CPU rows invariant but launch many small kernels). A chunk
    from position 0 is plainly causal (flash attention); one over cached keys needs an explicit mask, which
    the memory-efficient kernel takes with K/V repeated per query head (it does not take GQA and a mask), as
    does a sliding window (keys window or more below a row masked too).
    """
    n, H, hd = q.shape
    kvh = kv_layer.shape[1]
    start = g.mask_from - 1  # the chunk's first position; its keys are positions 0 .. start + n - 1
    raw = kv_layer.index_select(2, g.tables.view(-1)).view(2, kvh, -1, hd)[:, :, : start + n]
    k, v = raw[0][None], raw[1][None]  # (1, kvh, L, hd)
    qh = q.transpose(0, 1)[None]  # (1, H, n, hd)
    if start == 0 and (window is None or window >= n):
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=kvh != H)
    else:
        keys = torch.arange(start + n, device=q.device)[None, :]
        rows = torch.arange(start, start + n, device=q.device)[:, None]
        visible = keys <= rows if window is None else (keys <= rows) & (keys > rows - window)  # (n, L)
        k, v = (t.repeat_interleave(H // kvh, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=visible, scale=scale)
    return out[0].transpose(0, 1)  # (n, H, hd)
