"""From sampled tokens to what a caller sees: detokenized text, stop checks, and delta RequestOutputs.

Each step's RequestOutput carries only what the step added (new token ids, logprobs, text), so streaming an
n-token answer costs O(n) over the whole stream, not O(n) per step. Stop strings: the last (longest stop - 1)
characters are held back until the next token shows they do not start a stop string, so text once emitted is
never taken back, and a stop string is found in the held-back text plus the new text alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.detokenizer import DetokenizerState, add_token, find_stop
from kvserve.model.sampler import SampleResult
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.request import Request, RequestStatus


@dataclass
class TrackedOutput:
    """One request's output state beyond its tokens: the prompt text, the detokenizer, held-back text."""

    prompt: str | None
    detok: DetokenizerState
    held: str = ""  # text produced but not emitted yet (could be the start of a stop string)
    holdback: int = 0  # longest stop string - 1
    cumulative_logprob: float = 0.0
    emitted_tokens: int = 0  # output tokens already sent in an earlier delta
    emitted_prompt_logprobs: bool = False

    @classmethod
    def for_request(cls, request: Request, prompt: str | None) -> TrackedOutput:
        params = request.sampling_params
        detok = DetokenizerState.after_prompt(request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens)
        return cls(prompt, detok, holdback=max((len(s) for s in params.stop), default=1) - 1)


def append_token(tokenizer: Tokenizer, request: Request, tracked: TrackedOutput, result: SampleResult) -> str:
    """Append a sampled token to the request and check its stop conditions (finishing it by setting its
    status). Returns the text this token makes sendable."""
    request.append_output_token(result.token_id, result.logprob)
    if result.logprob is not None:
        tracked.cumulative_logprob += result.logprob
    if result.top_logprobs is not None:
        request.output_top_logprobs.append(result.top_logprobs)
    status = request.check_stop()
    params = request.sampling_params
    if status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output:
        new_text = ""  # an EOS or stop token id ended it: its text is not part of the output (as in vLLM)
    else:
        new_text = add_token(tokenizer, tracked.detok, result.token_id)
    text = tracked.held + new_text
    if params.stop and new_text:
        hit = find_stop(text, len(new_text), params.stop)
        if hit is not None:
            stop, start = hit
            request.stop_reason = stop
            status = RequestStatus.FINISHED_STOPPED
            text = text[: start + len(stop) if params.include_stop_str_in_output else start]
    if status is not None:
        request.status = status
        tracked.held = ""
        return text
    cut = max(0, len(text) - tracked.holdback)
    tracked.held = text[cut:]
    return text[:cut]


def make_output(request: Request, tracked: TrackedOutput, text: str) -> RequestOutput:
    """The delta of this step: tokens since the last output, the text made sendable, and at the end the
    prompt logprobs (once all are computed)."""
    params = request.sampling_params
    new = slice(tracked.emitted_tokens, None)
    tracked.emitted_tokens = request.num_output_tokens
    want_logprobs = params.logprobs is not None
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=request.output_token_ids[new],
        cumulative_logprob=tracked.cumulative_logprob if want_logprobs else None,
        logprobs=request.output_logprobs[new] if want_logprobs else None,
        top_logprobs=request.output_top_logprobs[new] if params.logprobs else None,
        finish_reason=request.status.value if request.is_finished else None,
        stop_reason=request.stop_reason,
    )
    out = RequestOutput(
        request_id=request.request_id,
        prompt=tracked.prompt,
        prompt_token_ids=request.prompt_token_ids,
        outputs=[completion],
        finished=request.is_finished,
        num_cached_tokens=request.num_cached_tokens or 0,
        num_prompt_tokens_computed=request.num_prompt_tokens_computed,
        error=request.error,
    )
    k = params.prompt_logprobs
    if k is not None and not request.needs_prompt_logprobs and not tracked.emitted_prompt_logprobs:
        tracked.emitted_prompt_logprobs = True  # complete, so never appended to again: no copy
        out.prompt_logprobs = request.prompt_logprobs
        out.prompt_top_logprobs = request.prompt_top_logprobs if k > 0 else None
    return out
