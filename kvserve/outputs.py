"""What generation returns, in the shape vLLM users know: RequestOutput with CompletionOutputs.

LLMEngine.step() returns deltas: each RequestOutput holds what that step added (its text, token ids and
logprobs), cumulative_logprob the running total, prompt logprobs once, with the first output that has them.
The offline LLM API returns whole outputs, assembled by OutputAccumulator.
"""

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


class OutputAccumulator:
    """Whole outputs from the engine's per-step deltas (for the offline API, which returns whole outputs).
    Text pieces are joined once at the end, so accumulating n tokens costs O(n)."""

    def __init__(self) -> None:
        self._last: RequestOutput | None = None
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[float] | None = None
        self._top: list[dict[int, float]] | None = None
        self._prompt_logprobs: tuple[list | None, list | None] = (None, None)

    def add(self, delta: RequestOutput) -> None:
        c = delta.outputs[0]
        self._last = delta
        self._text.append(c.text)
        self._token_ids += c.token_ids
        if c.logprobs is not None:
            self._logprobs = self._logprobs if self._logprobs is not None else []
            self._logprobs += c.logprobs
        if c.top_logprobs is not None:
            self._top = self._top if self._top is not None else []
            self._top += c.top_logprobs
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = (delta.prompt_logprobs, delta.prompt_top_logprobs)

    def result(self) -> RequestOutput:
        last = self._last
        assert last is not None, "no output was added"
        c = last.outputs[0]
        whole = CompletionOutput(
            index=c.index,
            text="".join(self._text),
            token_ids=self._token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=self._logprobs,
            top_logprobs=self._top,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        prompt_logprobs, prompt_top = self._prompt_logprobs
        return RequestOutput(
            request_id=last.request_id,
            prompt=last.prompt,
            prompt_token_ids=last.prompt_token_ids,
            outputs=[whole],
            finished=last.finished,
            num_cached_tokens=last.num_cached_tokens,
            num_prompt_tokens_computed=last.num_prompt_tokens_computed,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top,
            error=last.error,
            metrics=last.metrics,
        )
