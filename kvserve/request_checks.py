"""The engine's checks of a new request, before anything is allocated: each failure is a typed error naming the
offending input (kvserve/errors.py), which the server maps to an HTTP 400."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvserve.errors import ContextLengthError, InvalidRequestError
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.engine import EngineLimits


def check_request(prompt: list[int], params: SamplingParams, limits: EngineLimits, num_blocks: int) -> list[int]:
    """The prompt's token ids once the request passed every check of the engine."""
    token_ids = [int(t) for t in prompt]
    n = len(token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty; it must contain at least one token", param="prompt")
    if n >= limits.max_model_len:
        raise ContextLengthError(
            f"this model's context length (max_model_len) is {limits.max_model_len} tokens, but the prompt "
            f"has {n}: at most {limits.max_model_len - 1} prompt tokens leave room for one generated token",
            param="prompt",
        )
    vocab = limits.vocab_size
    for what, param, ids in (
        ("token id", "prompt", token_ids),
        ("stop token id", "stop_token_ids", params.stop_token_ids),
        ("logit_bias token id", "logit_bias", params.logit_bias or ()),
    ):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"{what} {bad} is outside the vocabulary [0, {vocab})", param=param)
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > limits.max_logprobs:
            raise InvalidRequestError(f"{name} {k} exceeds max_logprobs {limits.max_logprobs}", param=name)
    total = min(n + (params.max_tokens or limits.max_model_len), limits.max_model_len)
    window = getattr(limits, "kv_window_tokens", None)
    if (total if window is None else min(total, window)) > limits.kv_capacity_tokens:
        raise ContextLengthError(
            f"the request needs up to {total} tokens of KV (prompt {n} + max_tokens), but the KV cache holds "
            f"{limits.kv_capacity_tokens} tokens ({num_blocks} blocks); lower max_tokens or "
            "raise kv_cache_memory",
            param="max_tokens",
        )
    return token_ids
