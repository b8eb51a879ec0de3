"""What generation returns, in the shape vLLM users know: RequestOutput with CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[float] | None = None  # of each chosen token, when asked for
    top_logprobs: list[dict[int, float]] | None = None  # the top-k alternatives per token, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens prefilled, recomputation after a preemption included
    # With SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first) and top-k alternatives
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
