"""ModelRunner: owns the KV tensor, turns a ModelBatch into tensors, runs the model, samples.

The flat batch is laid out [decodes (one token each) ..., prefill chunks ...] so attention can run every
decode in one padded call. It returns a ModelOutput (samples and prompt logprobs by sequence id) and writes
into nothing but the KV tensor: requests, scheduling and cache policy are the engine's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from kvserve.model import native
from kvserve.model.attention import KEY_CHUNK, QUERY_TILE, AttentionMetadata, build_group
from kvserve.model.batch import ModelBatch, ModelOutput, RowSampling, SeqChunk
from kvserve.model.config import ModelConfig
from kvserve.model.device import huge_page_buffer
from kvserve.model.llama import LlamaModel
from kvserve.model.sampler import sample


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all attention layers (0 for a purely recurrent model)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_attention_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * elem


# Sequences a shared-prefix group needs to pay for its own attention call (about 25 ops per layer). Measured,
# 8 bf16 decodes over cached 1,000-token prefixes: 4 pairs were 11% slower as 4 groups than as one, 3+3+2
# were 21% faster as 2 groups + the rest, 2 x 4 twice as fast as 2 groups.
MIN_SHARING = 3


def _by_first_chunk(decodes: list[SeqChunk], block_size: int) -> list[list[SeqChunk]]:
    """Decodes grouped by the blocks holding their first KEY_CHUNK keys, so each attention group's sequences
    can share their common cached prefix (one per system prompt or document); the rest form one group."""
    n = max(1, KEY_CHUNK // block_size)
    by_key: dict[tuple[int, ...], list[SeqChunk]] = {}
    for s in decodes:
        key = tuple(s.block_ids[:n]) if s.start >= KEY_CHUNK else ()
        by_key.setdefault(key, []).append(s)
    clusters = [c for k, c in by_key.items() if k and len(c) >= MIN_SHARING]
    rest = [s for k, c in by_key.items() if not k or len(c) < MIN_SHARING for s in c]
    return clusters + ([rest] if rest else [])


def _row_samplings(s: SeqChunk) -> list[RowSampling]:
    """The sampling of each row a chunk samples: one, or one per draft more, each seeing the drafts before it
    as outputs (penalties) and sampling the next position."""
    row = s.sampling
    assert row is not None
    if not s.num_drafts:
        return [row]
    drafts = s.token_ids[len(s.token_ids) - s.num_drafts :]
    if not row.params.adjusts_logits:  # only penalties read the outputs: don't copy them per draft row
        return [dataclasses.replace(row, position=row.position + j) for j in range(s.num_drafts + 1)]
    return [
        dataclasses.replace(row, output_token_ids=[*row.output_token_ids, *drafts[:j]], position=row.position + j)
        for j in range(s.num_drafts + 1)
    ]


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.device
        # (attention layers, 2, kv_heads, blocks, block_size, head_dim); zeros so padded (masked) reads stay
        # finite. Layout: kvserve/model/attention.py.
        shape = (cfg.num_attention_layers, 2, cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
        if self.device.type == "cpu":  # block gathers jump across the whole pool: huge pages spare the TLB
            elem = torch.empty((), dtype=model.dtype).element_size()
            buf = huge_page_buffer(math.prod(shape) * elem)
            self.kv_cache = buf.view(model.dtype).view(shape).zero_()
        else:
            self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        # The fused CPU kernel or the torch path, as the model was built (never both: they round differently).
        self.native = model.native_attention
        self._prompt_ids: dict[str, torch.Tensor] = {}  # distinct prompt ids of requests with a repetition penalty

    def release(self, request_id: str) -> None:
        """Forget a finished request's prompt ids."""
        self._prompt_ids.pop(request_id, None)

    def _history(self, seq_id: str, row: RowSampling) -> tuple[torch.Tensor | None, Sequence[int]]:
        """What the sampler's penalties read: the distinct prompt ids (made once per sequence, only for a
        repetition penalty) and the output ids."""
        prompt = None
        if row.params.repetition_penalty != 1.0:
            prompt = self._prompt_ids.get(seq_id)
            if prompt is None:
                ids = torch.tensor(list(row.prompt_token_ids), dtype=torch.long, device=self.device).unique()
                prompt = self._prompt_ids[seq_id] = ids
        return prompt, row.output_token_ids

    def execute(self, batch: ModelBatch) -> ModelOutput:
        """Run one step: the next token of every chunk with `sampling`, the logprobs of every `scoring`."""
        decodes = [s for s in batch.seqs if s.is_decode]
        prefills = [s for s in batch.seqs if not s.is_decode]
        # The torch path groups decodes by shared prefix (each cluster's rows contiguous); the kernel reads
        # every sequence's blocks in place and needs no grouping.
        clusters = [] if self.native else _by_first_chunk(decodes, self.block_size)
        if clusters:
            decodes = [s for cluster in clusters for s in cluster]
        seqs = decodes + prefills
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in seqs:
            token_ids.extend(s.token_ids)
            for pos in range(s.start, s.end):
                positions.append(pos)
                slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        logits_rows = list(range(len(decodes)))
        score_rows: list[int] = []
        row = len(decodes)
        for s in prefills:
            if s.scoring is not None:  # logits at position p score the token at p + 1
                first = s.scoring.first
                score_rows += range(row + first - s.start, row + first - s.start + len(s.scoring.targets))
            row += s.num_new_tokens
            if s.sampling is not None:  # the last position, and before it one per draft
                logits_rows.extend(range(row - 1 - s.num_drafts, row))
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        kernel_meta = None
        if self.native:
            kernel_meta = native.build_meta(
                [s.block_ids for s in seqs], [s.num_new_tokens for s in seqs], positions_t, dev
            )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            positions=positions_t,
            groups=[] if self.native else self._groups(clusters, prefills),
            native=kernel_meta,
        )
        rows = logits_rows + score_rows
        out = ModelOutput()
        logits = self._forward(
            torch.tensor(token_ids, device=dev),
            meta,
            torch.tensor(rows or [0], device=dev),  # a step of only partial chunks samples nothing
            batch,
            seqs,
            len(decodes),
            out,
        )
        if score_rows:
            scored = [s for s in prefills if s.scoring is not None]
            out.prompt_logprobs = _prompt_logprobs(logits[len(logits_rows) :], scored)
            logits = logits[: len(logits_rows)]
        sampling = [s for s in seqs if s.sampling is not None]
        if sampling:
            per_seq = [(s, row) for s in sampling for row in _row_samplings(s)]
            rows_in = [row for _, row in per_seq]
            keys = [None if r.seed is None else (r.seed, r.position) for r in rows_in]
            histories = [self._history(s.seq_id, r) for s, r in per_seq]
            params = [r.params for r in rows_in]
            banned = [r.banned_token_ids for r in rows_in]
            results = iter(sample(logits, params, keys, banned, histories, [r.allowed for r in rows_in]))
            for s in sampling:
                out.samples[s.seq_id] = next(results)
                if s.num_drafts:
                    out.draft_samples[s.seq_id] = [next(results) for _ in range(s.num_drafts)]
        return out

    def _groups(self, clusters: list[list[SeqChunk]], prefills: list[SeqChunk]) -> list:
        """The torch path's attention groups: one per decode cluster, one per QUERY_TILE of each prefill chunk
        (on CUDA one per prefill chunk)."""
        bs, dev = self.block_size, self.device
        group = self.model.config.num_attention_heads // self.model.config.num_key_value_heads
        windows = getattr(self.model, "attention_windows", ())  # sliding windows (hybrid models have none)
        groups, row = [], 0
        for cluster in clusters:
            positions, tables = [[s.start] for s in cluster], [s.block_ids for s in cluster]
            groups.append(build_group(row, positions, tables, bs, group, dev, windows=windows))
            row += len(cluster)
        # on CUDA a whole chunk per group, attended by SDPA (attention.py: no invariance claim); SDPA has no
        # soft-capping, so a model with it takes the chunked path there too
        cuda = dev.type == "cuda" and self.model.config.attn_softcap is None
        for s in prefills:
            step = s.num_new_tokens if cuda else QUERY_TILE
            for t0 in range(s.start, s.end, step):
                tile = list(range(t0, min(t0 + step, s.end)))
                groups.append(build_group(row + t0 - s.start, [tile], [s.block_ids], bs, group, dev, not cuda, windows))
            row += s.num_new_tokens
        return groups

    def _forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
        batch: ModelBatch,
        ordered: list[SeqChunk],
        num_decodes: int,
        out: ModelOutput,
    ) -> torch.Tensor:
        """The model call (rows: decodes, then prefill chunks, as `ordered`); a hook for runners with more
        state, which put what the caller must commit into `out`."""
        return self.model.forward(input_ids, self.kv_cache, meta, logits_rows)


PROMPT_LOGPROB_ROWS = 256  # rows per log_softmax when scoring prompt tokens (bounds the temporary)


def _prompt_logprobs(
    logits: torch.Tensor, scored: list[SeqChunk]
) -> dict[str, list[tuple[float, dict[int, float] | None]]]:
    """Each scored position's (logprob of its target, top-k alternatives), by sequence. logits: one row per
    scored position, sequences in order."""
    targets = [t for s in scored for t in s.scoring.targets]  # type: ignore[union-attr]
    ks = [s.scoring.top_k for s in scored for _ in s.scoring.targets]  # type: ignore[union-attr]
    chosen: list[float] = []
    tops: list[dict[int, float] | None] = []
    for lo in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        part = slice(lo, lo + PROMPT_LOGPROB_ROWS)
        logprobs = torch.log_softmax(logits[part].float(), dim=-1)
        t = torch.tensor(targets[part], device=logprobs.device)
        chosen += logprobs.gather(1, t[:, None])[:, 0].tolist()
        kmax = max(ks[part])
        if not kmax:
            tops += [None] * len(t)
            continue
        # one top-k and one copy to the host for all rows (a GPU would sync once per row otherwise)
        values, ids = torch.topk(logprobs, kmax, dim=-1)
        for k, v, i in zip(ks[part], values.tolist(), ids.tolist()):
            tops.append(dict(zip(i[:k], v[:k])) if k else None)
    result, i = {}, 0
    for s in scored:
        n = len(s.scoring.targets)  # type: ignore[union-attr]
        result[s.seq_id] = list(zip(chosen[i : i + n], tops[i : i + n]))
        i += n
    return result
