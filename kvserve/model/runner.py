"""ModelRunner: owns the KV tensor, turns a SchedulerOutput into tensors, runs the model, samples.

The flat batch is laid out [decodes (one token each) ..., prefill chunks ...] so attention can run every
decode in one padded call. Sampled results come back in the scheduler's order.
"""

from __future__ import annotations

import math

import torch

from kvserve.batch import ScheduledRequest, SchedulerOutput
from kvserve.model import native
from kvserve.model.attention import KEY_CHUNK, QUERY_TILE, AttentionMetadata, build_group
from kvserve.model.config import ModelConfig
from kvserve.model.device import huge_page_buffer
from kvserve.model.llama import LlamaModel
from kvserve.model.sampler import SampleResult, sample
from kvserve.request import Request


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all attention layers (0 for a purely recurrent model)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_attention_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * elem


# Sequences a shared-prefix group needs to pay for its own attention call (about 25 ops per layer). Measured,
# 8 bf16 decodes over cached 1,000-token prefixes: 4 pairs were 11% slower as 4 groups than as one, 3+3+2
# were 21% faster as 2 groups + the rest, 2 x 4 twice as fast as 2 groups.
MIN_SHARING = 3


def _by_first_chunk(decodes: list[ScheduledRequest], block_size: int) -> list[list[ScheduledRequest]]:
    """Decodes grouped by the blocks holding their first KEY_CHUNK keys, so each attention group's sequences
    can share their common cached prefix (one per system prompt or document); the rest form one group."""
    n = max(1, KEY_CHUNK // block_size)
    by_key: dict[tuple[int, ...], list[ScheduledRequest]] = {}
    for s in decodes:
        key = tuple(s.block_ids[:n]) if s.start >= KEY_CHUNK else ()
        by_key.setdefault(key, []).append(s)
    clusters = [c for k, c in by_key.items() if k and len(c) >= MIN_SHARING]
    rest = [s for k, c in by_key.items() if not k or len(c) < MIN_SHARING for s in c]
    return clusters + ([rest] if rest else [])


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, seed: int = 0):
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
        # The fused CPU kernel where it builds; else the torch path (never both: they round differently).
        self.native = native.enabled(self.device, model.dtype)
        self._generators: dict[str, torch.Generator] = {}
        self._prompt_ids: dict[str, torch.Tensor] = {}  # distinct prompt ids of requests with a repetition penalty
        self._default_generator = torch.Generator(device=self.device).manual_seed(seed)

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator and prompt ids."""
        self._generators.pop(request_id, None)
        self._prompt_ids.pop(request_id, None)

    def _history(self, request: Request) -> tuple[torch.Tensor | None, list[int]]:
        """What the sampler's penalties read: the distinct prompt ids (made once per request, only for a
        repetition penalty) and the output ids."""
        prompt = None
        if request.sampling_params.repetition_penalty != 1.0:
            prompt = self._prompt_ids.get(request.request_id)
            if prompt is None:
                ids = torch.tensor(request.prompt_token_ids, dtype=torch.long, device=self.device).unique()
                prompt = self._prompt_ids[request.request_id] = ids
        return prompt, request.output_token_ids

    def _generator(self, s: ScheduledRequest) -> torch.Generator | None:
        params = s.request.sampling_params
        if params.greedy:
            return None
        if params.seed is None:
            return self._default_generator
        gen = self._generators.get(s.request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
            self._generators[s.request.request_id] = gen
        return gen

    def execute(self, sched: SchedulerOutput) -> dict[str, SampleResult]:
        """Run one step; returns the sampled token of every request whose chunk reached its end."""
        is_decode = [s.num_new_tokens == 1 and s.samples for s in sched.scheduled]
        decodes = [s for s, d in zip(sched.scheduled, is_decode) if d]
        prefills = [s for s, d in zip(sched.scheduled, is_decode) if not d]
        # The torch path groups decodes by shared prefix (each cluster's rows contiguous); the kernel reads
        # every sequence's blocks in place and needs no grouping.
        clusters = [] if self.native else _by_first_chunk(decodes, self.block_size)
        if clusters:
            decodes = [s for cluster in clusters for s in cluster]
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in decodes + prefills:
            token_ids.extend(s.token_ids)
            for pos in range(s.start, s.end):
                positions.append(pos)
                slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        logits_rows = list(range(len(decodes)))
        prompt_rows: list[tuple[Request, int, int]] = []  # (request, row, prompt index its logits score)
        row = len(decodes)
        for s in prefills:
            r = s.request
            if r.needs_prompt_logprobs:  # logits at position p score prompt token p + 1 (each recorded once)
                first = max(s.start, len(r.prompt_logprobs) - 1)
                prompt_rows += [
                    (r, row + p - s.start, p + 1) for p in range(first, min(s.end, r.num_prompt_tokens - 1))
                ]
            row += s.num_new_tokens
            if s.samples:
                logits_rows.append(row - 1)
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        seqs = decodes + prefills
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
        sampling = [s for s in seqs if s.samples]
        rows = logits_rows + [r for _, r, _ in prompt_rows]
        logits = self._forward(
            torch.tensor(token_ids, device=dev),
            meta,
            torch.tensor(rows or [0], device=dev),  # a step of only partial chunks samples nothing
            decodes,
            prefills,
        )
        if prompt_rows:
            _record_prompt_logprobs(logits[len(logits_rows) :], prompt_rows)
            logits = logits[: len(logits_rows)]
        if not sampling:
            return {}
        params = [s.request.sampling_params for s in sampling]
        banned = [_banned_before_min_tokens(s.request) for s in sampling]
        histories = [self._history(s.request) for s in sampling]
        results = sample(logits, params, [self._generator(s) for s in sampling], banned, histories)
        return {s.request.request_id: r for s, r in zip(sampling, results)}

    def _groups(self, clusters: list[list[ScheduledRequest]], prefills: list[ScheduledRequest]) -> list:
        """The torch path's attention groups: one per decode cluster, one per QUERY_TILE of each prefill chunk
        (on CUDA one per prefill chunk)."""
        bs, dev = self.block_size, self.device
        group = self.model.config.num_attention_heads // self.model.config.num_key_value_heads
        groups, row = [], 0
        for cluster in clusters:
            groups.append(
                build_group(row, [[s.start] for s in cluster], [s.block_ids for s in cluster], bs, group, dev)
            )
            row += len(cluster)
        cuda = dev.type == "cuda"  # a whole chunk per group, attended by SDPA (attention.py: no invariance claim)
        for s in prefills:
            step = s.num_new_tokens if cuda else QUERY_TILE
            for t0 in range(s.start, s.end, step):
                tile = list(range(t0, min(t0 + step, s.end)))
                groups.append(build_group(row + t0 - s.start, [tile], [s.block_ids], bs, group, dev, not cuda))
            row += s.num_new_tokens
        return groups

    def _forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
        decodes: list[ScheduledRequest],
        prefills: list[ScheduledRequest],
    ) -> torch.Tensor:
        """The model call (rows: decodes, then prefill chunks); a hook for runners with more state."""
        return self.model.forward(input_ids, self.kv_cache, meta, logits_rows)


PROMPT_LOGPROB_ROWS = 256  # rows per log_softmax when scoring prompt tokens (bounds the temporary)


def _record_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Request, int, int]]) -> None:
    """Each prompt token's logprob (and top-k) from the logits of the position before it, appended to its
    request once: a retried batch or a recomputation after preemption finds it recorded and skips it."""
    for lo in range(0, len(rows), PROMPT_LOGPROB_ROWS):
        part = rows[lo : lo + PROMPT_LOGPROB_ROWS]
        logprobs = torch.log_softmax(logits[lo : lo + len(part)].float(), dim=-1)
        targets = torch.tensor([r.prompt_token_ids[j] for r, _, j in part], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        kmax = max(r.sampling_params.prompt_logprobs or 0 for r, _, _ in part)
        top_values = top_ids = None
        if kmax:  # one top-k and one copy to the host for all rows (a GPU would sync once per row otherwise)
            values, ids = torch.topk(logprobs, kmax, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        for i, (r, _, j) in enumerate(part):
            if j != len(r.prompt_logprobs):
                continue
            k = r.sampling_params.prompt_logprobs
            top = dict(zip(top_ids[i][:k], top_values[i][:k])) if k else None
            r.prompt_logprobs.append(chosen[i])
            r.prompt_top_logprobs.append(top)


def _banned_before_min_tokens(request) -> list[int]:
    """EOS (unless ignore_eos) and the stop token ids, while the request has fewer than min_tokens outputs: as in
    vLLM, min_tokens keeps them from being sampled at all, not only from ending the request."""
    p = request.sampling_params
    if request.num_output_tokens >= p.min_tokens:
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids))
