"""The engine's side of the model contract: a step's ScheduledRequests become a ModelBatch, and the
ModelOutput's prompt logprobs are recorded on their requests.

The model runner sees sequences by request id, their tokens, positions and block tables, and what each row
samples or scores; it never sees a Request. Hybrid models' state slots are brought to each chunk's start by
the RecurrentCacheManager before the batch is built.
"""

from __future__ import annotations

import torch

from kvserve.batch import ScheduledRequest
from kvserve.model.batch import ModelBatch, ModelOutput, PromptScoring, RowSampling, SeqChunk
from kvserve.recurrent.manager import RecurrentCacheManager
from kvserve.request import Request


def build_batch(
    scheduled: list[ScheduledRequest],
    recurrent: RecurrentCacheManager | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> ModelBatch:
    """masks: structured outputs' allowed-token masks of sampling requests, by request id."""
    seqs = [_chunk(s, (masks or {}).get(s.request.request_id)) for s in scheduled]
    slots = None
    if recurrent is not None:
        slots = [recurrent.prepare(s.request, s.start) for s in scheduled]
    return ModelBatch(seqs, slots)


def _chunk(s: ScheduledRequest, allowed: torch.Tensor | None) -> SeqChunk:
    r = s.request
    sampling = None
    if s.samples:
        p = r.sampling_params
        seed = None if p.greedy else r.sampling_seed
        banned = _banned_before_min_tokens(r)
        sampling = RowSampling(p, r.prompt_token_ids, r.output_token_ids, banned, seed, r.num_tokens, allowed)
    return SeqChunk(r.request_id, s.token_ids, s.start, s.block_ids, sampling, _scoring(s), s.num_drafts)


def _scoring(s: ScheduledRequest) -> PromptScoring | None:
    """Prompt positions [first, stop) whose logits score prompt tokens first + 1 ... stop; a position recorded
    already (a retried batch, recomputation after preemption) is not scored again."""
    r = s.request
    if not r.needs_prompt_logprobs:
        return None
    first = max(s.start, len(r.prompt_logprobs) - 1)
    stop = min(s.end, r.num_prompt_tokens - 1)
    if first >= stop:
        return None
    k = r.sampling_params.prompt_logprobs or 0
    return PromptScoring(first, r.prompt_token_ids[first + 1 : stop + 1], k)


def record_prompt_logprobs(batch: ModelBatch, out: ModelOutput, requests: dict[str, Request]) -> None:
    """Append each scored prompt token's logprob (and top-k) to its request, each position once."""
    for s in batch.seqs:
        scored = out.prompt_logprobs.get(s.seq_id)
        if scored is None or s.scoring is None:
            continue
        r = requests[s.seq_id]
        for j, (logprob, top) in enumerate(scored, start=s.scoring.first + 1):
            if j == len(r.prompt_logprobs):
                r.prompt_logprobs.append(logprob)
                r.prompt_top_logprobs.append(top)


def _banned_before_min_tokens(request: Request) -> list[int]:
    """EOS (unless ignore_eos) and the stop token ids, while the request has fewer than min_tokens outputs: as in
    vLLM, min_tokens keeps them from being sampled at all, not only from ending the request."""
    p = request.sampling_params
    if request.num_output_tokens >= p.min_tokens:
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids))
