"""Request: one generation's state as the scheduler and KV cache manager see it (no torch here).

all_token_ids = prompt_token_ids + output_token_ids
[0, num_computed_tokens)             KV is in the request's blocks (cached hits included)
[num_computed_tokens, num_tokens)    still to compute; the last token's logits give the next sample
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvserve.kv.hashing import BlockHash
from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    # With prompt_logprobs: entry j is prompt token j's logprob given the tokens before it (None for j = 0)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission, in tokens
    num_preemptions: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens prefilled so far, recomputation after preemption included
    block_hashes: list[BlockHash] = field(default_factory=list)  # of the full blocks of all_token_ids
    stop_reason: int | str | None = None
    error: str | None = None
    first_token_time: float | None = None
    sampling_seed: int | None = None  # keys the request's random choices (its own seed, else the engine's draw)
    draft_token_ids: list[int] = field(default_factory=list)  # speculative drafts proposed for the next step

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs.append(None)
            self.prompt_top_logprobs.append(None)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs that are not all computed yet (so the prefix cache may not skip them)."""
        return self.sampling_params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def extra_keys(self) -> tuple[str, ...]:
        return (self.cache_salt,) if self.cache_salt else ()

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int, logprob: float | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions after a new token (stop strings are the detokenizer's job)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
