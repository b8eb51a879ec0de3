"""ModelBatch: what the model runner is given each step, built by the engine. The runner knows sequences by
an opaque id and never sees a request, the scheduler or the cache policy.

Each SeqChunk computes positions [start, start + len(token_ids)) of one sequence, whose KV lives in the
blocks of its block table. A chunk that reaches the end of the sequence's known tokens carries `sampling`:
its last logits give the next token. A chunk whose last `num_drafts` tokens are speculative drafts samples at
each of its last num_drafts + 1 positions, each as plain decoding would have sampled it had the drafts before
it been the sequence's tokens (the caller keeps the drafts up to the first mismatch).
A chunk of a request scoring its prompt carries `scoring`: the logits at
positions [first, first + len(targets)) score targets (the prompt tokens one position later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvserve.model.sampler import SampleResult
from kvserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowSampling:
    """How to pick a sequence's next token."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # for the repetition penalty
    output_token_ids: Sequence[int]  # outputs so far (penalties); read, never written
    banned_token_ids: list[int] = field(default_factory=list)  # e.g. EOS before min_tokens
    seed: int | None = None  # keys the random choice with `position` (kvserve/model/sampler.py); None: greedy
    position: int = 0  # index in the sequence of the token this row samples
    allowed: torch.Tensor | None = None  # structured outputs: bool mask of the tokens the row may pick


@dataclass(frozen=True)
class PromptScoring:
    """Prompt tokens to score from this chunk's logits: the logits at position first + i score targets[i]."""

    first: int
    targets: list[int]
    top_k: int  # alternatives to return per position (0: the chosen token's logprob only)


@dataclass(frozen=True)
class SeqChunk:
    seq_id: str
    token_ids: list[int]
    start: int  # position of token_ids[0]
    block_ids: list[int]  # the sequence's block table
    sampling: RowSampling | None = None
    scoring: PromptScoring | None = None
    num_drafts: int = 0  # the last num_drafts token_ids are drafts to verify (then sampling is set)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.sampling is not None


@dataclass(frozen=True)
class ModelBatch:
    seqs: list[SeqChunk]
    state_slots: list[int] | None = None  # hybrid models: each sequence's recurrent state slot (same order)


@dataclass
class ModelOutput:
    samples: dict[str, SampleResult] = field(default_factory=dict)  # seq id -> next token
    # seq id -> the tokens sampled after each of its drafts (num_drafts of them, after `samples`' one)
    draft_samples: dict[str, list[SampleResult]] = field(default_factory=dict)
    # seq id -> (logprob, top-k alternatives or None) of each scored position, in order
    prompt_logprobs: dict[str, list[tuple[float, dict[int, float] | None]]] = field(default_factory=dict)
    # hybrid models: the recurrent states after the step, rows in `state_order` (seq ids); the caller commits them
    state_order: list[str] = field(default_factory=list)
    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
