"""Paged attention in plain torch, written so that a token's result never depends on its batch.

On CPU, where kvserve's fused C kernel builds (kvserve/model/native.py, the default there), the kernel runs
attention instead and this module's groups are not built; this path serves CUDA, float16, and CPUs without
a C compiler (or KVSERVE_ATTENTION=torch). Both paths keep every row batch-invariant; they round
differently, so a process uses one of them.

The KV cache of one layer is a view of the engine's single preallocated tensor:
    kv_layer: (2, num_kv_heads, num_blocks, block_size, head_dim)      [0] = keys, [1] = values
A token at absolute position p of a sequence with block table bt lives in slot bt[p // bs] * bs + p % bs of
every head. Heads outermost: gathering a batch's blocks (index_select over the block axis) yields
(kv_heads, batch, keys, head_dim) directly, the layout the attention GEMMs read, with no permuted copy.

Batch invariance. Greedy outputs must not change when a prompt is split into chunks, served from cached
blocks, batched with other requests or recomputed after preemption. Library attention kernels break that:
torch's CPU flash kernel and plain GEMMs pick different blockings for different query counts and context
lengths, so the same row gets different rounding (measured: up to 0.12 in a bf16 logprob). Here every row
takes the same arithmetic whatever its neighbours:
  * one code path for decode and prefill (decode is a chunk of one token);
  * math in float32; scores = q . k over head_dim (a fixed-length reduction);
  * keys are padded with masked zeros to a multiple of KEY_CHUNK and cut into chunks at fixed absolute
    positions; a row's softmax is two passes: its max over all keys (exact in any order), then per chunk the
    sum of exp(score - max) and a GEMM with exactly KEY_CHUNK terms for the values, chunk totals added in
    chunk order: chunks past a row's position add exact zeros;
  * so a chunk's numbers depend only on the row and that chunk's keys: decodes whose sequences read the same
    cached blocks (one system prompt, one document) share those chunks, gathered once and multiplied for all
    rows in one GEMM, and each row still gets the bits it gets alone (tests/model/test_golden.py);
  * GEMM row counts are kept in the shapes where MKL's result for a row does not depend on the row count
    (see kvserve/model/invariant.py).

Sliding windows (Mistral, Qwen2/3, Phi-3, Gemma's local layers): a query at position p sees keys
p - window + 1 .. p, as transformers' sliding-window mask. Each group also holds, per window size, its keys
from the first chunk any of its rows sees, masked on both sides (AttentionGroup.windows); the chunks it skips
would add exact zeros, so a row's bits still depend only on the row. Blocks that fall out of every window
stay allocated (the KV manager frees a sequence's blocks when it finishes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvserve.model import native
from kvserve.model.attention_cuda import sdpa_chunk
from kvserve.model.families import softcap_
from kvserve.model.invariant import invariant_rows
from kvserve.model.native import NativeMeta

KEY_CHUNK = 128  # keys per P @ V GEMM: smaller pads short contexts less, larger means fewer GEMMs
QUERY_TILE = 128  # prefill tokens per tile: each tile reads keys only up to its last position (causal skip)


@dataclass
class AttentionGroup:
    """B sequences with n new tokens each, attended in one call: rows [row_start, row_start + B * n).

    Decodes form one group (n = 1); each prefill chunk forms one group per QUERY_TILE tokens (B = 1), so a
    tile attends keys only up to its own last position (on CUDA: one group per chunk, attended by SDPA).
    Each group gathers exactly the keys it reads, so the gathered K/V splits into KEY_CHUNK-key chunks
    without a copy.
    """

    row_start: int
    batch: int  # B
    tokens: int  # n per sequence
    tables: torch.Tensor  # (B, blocks) long; padding points at block 0 (masked)
    masked: torch.Tensor | None  # (1, B, chunks from mask_from // KEY_CHUNK, Mp, KEY_CHUNK) bool, True = not
    # attended; None for a CUDA prefill chunk (attended by SDPA with a causal mask of its own)
    keys: int  # L: keys attended (a multiple of KEY_CHUNK)
    mask_from: int  # keys below this are visible to every row (row t*G + g: token t, head g); masked: the rest
    shared: int = 0  # S: leading keys (whole chunks) every sequence of the group reads from the same blocks
    shared_table: torch.Tensor | None = None  # (1, blocks) long: the blocks holding keys [0, S)
    key_offset: int = 0  # where key S sits in the gather of `tables` (which starts at block S // block_size)
    # a sliding window's view of the group: keys from first_key (a KEY_CHUNK multiple), every chunk masked
    first_key: int = 0
    windows: dict[int, AttentionGroup] = field(default_factory=dict)  # window -> view, for windows that hide keys


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch; passed to forward() as an argument, never global."""

    slot_mapping: torch.Tensor  # (T,) long: cache slot of each token in the flat batch
    positions: torch.Tensor  # (T,) long
    groups: list[AttentionGroup]
    native: NativeMeta | None = None  # set when the fused CPU kernel runs attention (kvserve/model/native.py)


def padded_keys(n: int) -> int:
    """Keys attended for a context of n tokens: n rounded up to a multiple of KEY_CHUNK."""
    return -(-n // KEY_CHUNK) * KEY_CHUNK


def build_group(
    row_start: int,
    positions: list[list[int]],
    tables: list[list[int]],
    block_size: int,
    group_size: int,
    device: torch.device,
    need_mask: bool = True,
    windows: tuple[int, ...] = (),
) -> AttentionGroup:
    """positions[b] = the n absolute positions of sequence b's new tokens; tables[b] its block table.

    need_mask=False (one sequence's prefill chunk on CUDA) skips the chunked mask: SDPA makes its own.
    windows: the model's sliding windows; the group gets a view for each one that hides a key from some row.
    """
    B, n = len(positions), len(positions[0])
    L = padded_keys(max(p[-1] for p in positions) + 1)
    M = n * group_size
    Mp = invariant_rows(M, torch.float32)
    q_pos = torch.tensor(positions, dtype=torch.long).repeat_interleave(group_size, dim=1)  # (B, M)
    mask_from = min(p[0] for p in positions) + 1
    q_pos = torch.nn.functional.pad(q_pos, (0, Mp - M), value=mask_from - 1)  # padded rows: discarded
    first = mask_from // KEY_CHUNK * KEY_CHUNK  # the first chunk with a key some row may not attend
    keys = torch.arange(first, L).view(1, -1, KEY_CHUNK)  # (1, chunks, KEY_CHUNK)
    masked = keys[:, :, None, :] > q_pos[:, None, :, None] if need_mask else None  # (B, chunks, Mp, KEY_CHUNK)
    S = _shared_keys(tables, block_size, mask_from) if B > 1 else 0
    skip = S // block_size  # whole blocks of the shared keys: the per-sequence gather starts after them
    width = -(-L // block_size) - skip
    padded = [(t[skip : skip + width] + [0] * width)[:width] for t in tables]  # padding: block 0, masked
    shared_table = None
    if S:
        shared_table = torch.tensor([tables[0][: -(-S // block_size)]], dtype=torch.long, device=device)
    tables_t = torch.tensor(padded, dtype=torch.long, device=device)
    offset = S - skip * block_size
    masked = masked[None].to(device) if masked is not None else None
    group = AttentionGroup(row_start, B, n, tables_t, masked, L, mask_from, S, shared_table, offset)
    for window in windows if need_mask else ():  # (SDPA applies a CUDA prefill chunk's window in its mask)
        if max(p[-1] for p in positions) >= window:  # else no row has a key outside the window
            group.windows[window] = _window_view(group, q_pos, tables, block_size, window, device)
    return group


def _window_view(
    g: AttentionGroup,
    q_pos: torch.Tensor,
    tables: list[list[int]],
    block_size: int,
    window: int,
    device: torch.device,
) -> AttentionGroup:
    """The group as a layer with this sliding window attends it: keys from the first KEY_CHUNK any row sees
    (q_pos (B, Mp): each row's position), masked where above the row or window or more below it. No shared
    prefix: the sequences' windows start at their own positions."""
    first = max(0, g.mask_from - window) // KEY_CHUNK * KEY_CHUNK  # the lowest row sees from mask_from - window
    keys = torch.arange(first, g.keys).view(1, -1, 1, KEY_CHUNK)  # (1, chunks, 1, KEY_CHUNK)
    rows = q_pos[:, None, :, None]  # (B, 1, Mp, 1)
    masked = ((keys > rows) | (keys <= rows - window))[None].to(device)
    skip = first // block_size
    width = -(-g.keys // block_size) - skip
    padded = [(t[skip : skip + width] + [0] * width)[:width] for t in tables]  # padding: block 0, masked
    tables_t = torch.tensor(padded, dtype=torch.long, device=device)
    # mask_from = first: every chunk of the view is masked (its `first` chunk in _attend_group is 0)
    return replace(g, tables=tables_t, masked=masked, mask_from=first, shared=0, shared_table=None,
                   key_offset=first - skip * block_size, first_key=first)  # fmt: skip


def _shared_keys(tables: list[list[int]], block_size: int, mask_from: int) -> int:
    """Leading keys, in whole KEY_CHUNKs, that every table maps to the same blocks and every row may attend."""
    common = 0
    for column in zip(*tables):
        if any(b != column[0] for b in column):
            break
        common += 1
    return min(common * block_size, mask_from) // KEY_CHUNK * KEY_CHUNK


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k, v (T, kv_heads, head_dim) into their cache slots."""
    _, kvh, nb, bs, hd = kv_layer.shape
    kv_layer[0].view(kvh, nb * bs, hd).index_copy_(1, slot_mapping, k.transpose(0, 1))
    kv_layer[1].view(kvh, nb * bs, hd).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _gather(kv_layer: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """kv_layer (2, kvh, blocks, bs, hd), tables (B, nb) -> (2, kvh, B, nb * bs, hd) float32, contiguous."""
    _, kvh, _, bs, hd = kv_layer.shape
    B, nb = tables.shape
    raw = kv_layer.index_select(2, tables.view(-1)).view(2, kvh, B, nb * bs, hd)  # one copy of the blocks
    return raw.float()  # a view in float32; one contiguous conversion otherwise


def _attend_group(
    q: torch.Tensor,
    kv: torch.Tensor,
    g: AttentionGroup,
    scale: float,
    shared_kv: torch.Tensor | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (B * n, heads, hd), kv from _gather, shared_kv (2, kvh, S, hd) or None -> (B * n, heads, hd) float32.

    Two passes over fixed KEY_CHUNK-key chunks: a row's max over all its keys (exact, order-free), then per
    chunk its sum of exp(score - max) and its exp-weighted sum of values, added up over the chunks in order.
    A chunk's numbers depend only on the row and the chunk's keys, so a chunk that several sequences read
    from the same blocks (a shared prompt prefix, decoding) is gathered once and multiplied for all of them in
    one GEMM, and the row gets the same bits as when it is computed alone.
    """
    B, n = g.batch, g.tokens
    H, hd = q.shape[1], q.shape[2]
    kvh = kv.shape[1]
    G = H // kvh
    S, L = g.shared, g.keys
    start = S or g.first_key  # the gathered keys start here: after the shared ones, or at a window's first
    C = (L - start) // KEY_CHUNK
    # (kvh, B, C, KEY_CHUNK, hd): this group's keys [start, L) cut into chunks (a view of the gather)
    keys = kv[0, :, :, g.key_offset : g.key_offset + L - start].view(kvh, B, C, KEY_CHUNK, hd)
    values = kv[1, :, :, g.key_offset : g.key_offset + L - start].view(kvh, B, C, KEY_CHUNK, hd)
    # (B, n, kvh, G, hd) -> (kvh, B, n*G, hd): row t*G + g is token t, query head kv_head * G + g
    qg = (q.float() * scale).view(B, n, kvh, G, hd).permute(2, 0, 1, 3, 4).reshape(kvh, B, n * G, hd)
    M, Mp = n * G, g.masked.shape[-2]
    if Mp != M:
        qg = torch.nn.functional.pad(qg, (0, 0, 0, Mp - M))
    scores = torch.matmul(qg[:, :, None], keys.transpose(3, 4))  # (kvh, B, C, Mp, KEY_CHUNK)
    if softcap is not None:  # before the mask, as transformers (padding keys' scores are masked after)
        softcap_(scores, softcap)
    first = (g.mask_from // KEY_CHUNK * KEY_CHUNK - start) // KEY_CHUNK
    scores[:, :, first:].masked_fill_(g.masked, float("-inf"))  # only the chunks on a tile's diagonal
    row_max = scores.amax(dim=(2, 4), keepdim=True)  # (kvh, B, 1, Mp, 1)
    if S:  # the rows of every sequence against the shared chunks, one GEMM per chunk for the whole batch
        Cs = S // KEY_CHUNK
        shared_k = shared_kv[0].view(kvh, Cs, KEY_CHUNK, hd)
        shared_v = shared_kv[1].view(kvh, Cs, KEY_CHUNK, hd)
        shared = torch.matmul(qg.reshape(kvh, 1, B * Mp, hd), shared_k.transpose(2, 3))  # (kvh, Cs, B*Mp, KC)
        shared = shared.view(kvh, Cs, B, Mp, KEY_CHUNK)
        if softcap is not None:
            softcap_(shared, softcap)
        row_max = torch.maximum(row_max, shared.amax(dim=(1, 4)).view(kvh, B, 1, Mp, 1))
        shared_sums, shared_outs = _exp_chunks(
            shared.view(kvh, Cs, B * Mp, KEY_CHUNK), row_max.view(kvh, 1, B * Mp, 1), shared_v
        )
    sums, outs = _exp_chunks(scores, row_max, values)  # (kvh, B, C, Mp), (kvh, B, C, Mp, hd)
    if S:  # shared chunks first: they hold the lowest keys
        sums = torch.cat([shared_sums.view(kvh, Cs, B, Mp).transpose(1, 2), sums], dim=2)
        outs = torch.cat([shared_outs.view(kvh, Cs, B, Mp, hd).transpose(1, 2), outs], dim=2)
    # Chunk totals added in chunk order: chunks past a row's position add exact zeros, so the number of
    # chunks in the group does not change a row's bits.
    num, den = outs[:, :, 0].clone(), sums[:, :, 0].clone()
    for c in range(1, outs.shape[2]):
        num += outs[:, :, c]
        den += sums[:, :, c]
    out = num / den[..., None]  # (kvh, B, Mp, hd)
    return out[:, :, :M].view(kvh, B, n, G, hd).permute(1, 2, 0, 3, 4).reshape(B * n, H, hd)


def _exp_chunks(scores: torch.Tensor, row_max: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., rows, KEY_CHUNK) -> per chunk and row: sum of exp(score - max), and exp-weighted values."""
    weights = scores.sub_(row_max).exp_()  # in place: the scores are not needed again
    return weights.sum(-1), torch.matmul(weights, values)


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: (T, heads, head_dim) -> (T, heads, head_dim) in q's dtype, reading K/V from kv_layer (already written).

    window: the layer's sliding window (None: every earlier key); softcap: scores -> softcap * tanh(s / softcap).
    The native kernel implements neither (the model keeps it off for models that need them).
    """
    if meta.native is not None:
        assert window is None and softcap is None, "the attention kernel has no sliding window or soft-capping"
        return native.paged_attention(q, kv_layer, meta.native, scale)
    out = torch.empty_like(q)
    for group in meta.groups:
        if group.masked is None:  # a prefill chunk on CUDA
            rows = slice(group.row_start, group.row_start + group.tokens)
            out[rows] = sdpa_chunk(q[rows], kv_layer, group, scale, window)
            continue
        g = group.windows.get(window, group) if window is not None else group
        kv = _gather(kv_layer, g.tables)
        shared_kv = _gather(kv_layer, g.shared_table)[:, :, 0, : g.shared] if g.shared_table is not None else None
        rows = slice(g.row_start, g.row_start + g.batch * g.tokens)
        out[rows] = _attend_group(q[rows], kv, g, scale, shared_kv, softcap).to(q.dtype)
    return out
