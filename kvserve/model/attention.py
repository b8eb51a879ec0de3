"""Paged attention in plain torch, written so that a token's result never depends on its batch.

The KV cache of one layer is a view of the engine's single preallocated tensor:
    kv_layer: (2, num_blocks, block_size, num_kv_heads, head_dim)      [0] = keys, [1] = values
A token at absolute position p of a sequence with block table bt lives in slot bt[p // bs] * bs + p % bs.

Batch invariance. Greedy outputs must not change when a prompt is split into chunks, served from cached
blocks, batched with other requests or recomputed after preemption. Library attention kernels break that:
torch's CPU flash kernel and plain GEMMs pick different blockings for different query counts and context
lengths, so the same row gets different rounding (measured: up to 0.12 in a bf16 logprob). Here every row
takes the same arithmetic whatever its neighbours:
  * one code path for decode and prefill (decode is a chunk of one token);
  * math in float32; scores = q . k over head_dim (a fixed-length reduction);
  * keys are padded with masked zeros to a multiple of KEY_CHUNK, and P @ V is summed chunk by chunk in a
    fixed order, each chunk a GEMM with exactly KEY_CHUNK terms: keys past a row's position add exact zeros;
  * GEMM row counts are kept in the shapes where MKL's result for a row does not depend on the row count
    (see kvserve/model/invariant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.model.invariant import invariant_rows

KEY_CHUNK = 256  # keys per P @ V GEMM; a multiple of every block size we accept up to 256
QUERY_TILE = 128  # prefill tokens per tile: each tile reads keys only up to its last position (causal skip)


@dataclass
class SeqChunk:
    """One sequence's new tokens in the flat batch: rows [row, row + n) at positions [start, start + n)."""

    row: int
    start: int
    num_tokens: int
    block_table: torch.Tensor  # (num_blocks,) long, padded with block 0 to cover a multiple of KEY_CHUNK


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch; passed to forward() as an argument, never global."""

    slot_mapping: torch.Tensor  # (T,) long: cache slot of each token in the flat batch
    positions: torch.Tensor  # (T,) long
    num_decodes: int = 0  # the first num_decodes rows are single-token chunks, attended as one batch
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) long, padded with block 0
    prefills: list[SeqChunk] | None = None


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k, v (T, kv_heads, head_dim) into their cache slots."""
    _, nb, bs, kvh, hd = kv_layer.shape
    kv_layer[0].view(nb * bs, kvh, hd).index_copy_(0, slot_mapping, k)
    kv_layer[1].view(nb * bs, kvh, hd).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, tables: torch.Tensor, num_keys: int) -> torch.Tensor:
    """cache (blocks, bs, kvh, hd), tables (B, nb) -> (B, kvh, num_keys, hd) float32."""
    B = tables.shape[0]
    _, bs, kvh, hd = cache.shape
    x = cache[tables[:, : num_keys // bs]].view(B, num_keys, kvh, hd)
    return x.permute(0, 2, 1, 3).float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, kvh, M, hd) f32 with absolute positions q_pos (B, M); k, v (B, kvh, L, hd), L % KEY_CHUNK == 0."""
    B, kvh, M, hd = q.shape
    L = k.shape[2]
    Mp = invariant_rows(M, torch.float32)
    if Mp != M:
        q = torch.nn.functional.pad(q, (0, 0, 0, Mp - M))
        q_pos = torch.nn.functional.pad(q_pos, (0, Mp - M))
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, kvh, Mp, L)
    keys = torch.arange(L, device=q.device)
    scores.masked_fill_(keys[None, None, None, :] > q_pos[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, kvh, Mp, L // KEY_CHUNK, KEY_CHUNK)
    v = v.view(B, kvh, L // KEY_CHUNK, KEY_CHUNK, hd)
    out = torch.matmul(probs[:, :, :, 0], v[:, :, 0])  # (B, kvh, Mp, hd)
    for c in range(1, L // KEY_CHUNK):  # fixed order; chunks past a row's position add exact zeros
        out += torch.matmul(probs[:, :, :, c], v[:, :, c])
    return out[:, :, :M]


def _padded_keys(n: int) -> int:
    return -(-n // KEY_CHUNK) * KEY_CHUNK


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (T, heads, head_dim) -> (T, heads, head_dim) in q's dtype, reading K/V from kv_layer (already written)."""
    T, H, hd = q.shape
    kvh = kv_layer.shape[3]
    G = H // kvh
    out = torch.empty_like(q)
    B = meta.num_decodes
    if B:
        pos = meta.positions[:B]
        L = _padded_keys(int(pos.max()) + 1)
        k = _gather(kv_layer[0], meta.decode_block_tables, L)
        v = _gather(kv_layer[1], meta.decode_block_tables, L)
        qd = q[:B].float().view(B, kvh, G, hd)  # heads h = kv_head * G + g
        o = _attend(qd, k, v, pos[:, None].expand(B, G), scale)
        out[:B] = o.reshape(B, H, hd).to(q.dtype)
    for p in meta.prefills or ():
        for t0 in range(0, p.num_tokens, QUERY_TILE):
            n = min(QUERY_TILE, p.num_tokens - t0)
            rows = slice(p.row + t0, p.row + t0 + n)
            L = _padded_keys(p.start + t0 + n)
            table = p.block_table[None]
            k = _gather(kv_layer[0], table, L)
            v = _gather(kv_layer[1], table, L)
            qp = q[rows].float().view(n, kvh, G, hd).permute(1, 0, 2, 3).reshape(1, kvh, n * G, hd)
            pos = meta.positions[rows].repeat_interleave(G)[None]  # row t*G + g has token t's position
            o = _attend(qp, k, v, pos, scale)  # (1, kvh, n*G, hd)
            out[rows] = o.view(kvh, n, G, hd).permute(1, 0, 2, 3).reshape(n, H, hd).to(q.dtype)
    return out
