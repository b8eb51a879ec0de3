"""SamplingParams: how one request picks its tokens and when it stops (no torch here).

Greedy is temperature 0 (or below 1e-5, as in vLLM). top_k None means off, top_p 1.0 means off. A seed makes a
request's samples reproducible whatever else shares its batch (each seeded request owns its generator).

Logit adjustments, applied in vLLM's order before greedy or sampled choice (logprobs stay the raw model's):
logit_bias (token id -> added to its logit, -100..100, OpenAI), then repetition_penalty (transformers' and
vLLM's: a token in the prompt or the output has a positive logit divided by it, a negative one multiplied),
then frequency_penalty x the token's count in the output and presence_penalty x (count > 0) are subtracted
(OpenAI's definition, -2..2).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch.Generator accepts
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0  # beyond, logits / p or * p can overflow


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output (vLLM's StructuredOutputsParams): exactly one of a JSON schema (a dict or its
    JSON text), any JSON object, a regular expression, a choice of strings, or a grammar (Lark, or llama.cpp's
    GBNF). Compiled by llguidance (kvserve/structured.py)."""

    json: dict | str | None = field(default=None, hash=False)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs choice must be a non-empty list of non-empty strings")
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar; got "
                + (", ".join(given) or "none")
            )

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one (vLLM's min_p)
    seed: int | None = None
    max_tokens: int | None = 16  # None -> until the context is full
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's logprob; k: plus the top k
    prompt_logprobs: int | None = None  # the same for each prompt token (after the first); skips the prefix cache
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    speculative: bool = True  # with the engine's --speculative: False opts this request out (its tokens are the same)
    structured_outputs: StructuredOutputsParams | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # Accept lists / a single string for convenience, store tuples (frozen, hashable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if self.top_k is not None and self.top_k in (0, -1):
            object.__setattr__(self, "top_k", None)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or 0/-1 for off), got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX:  # logits stay finite
            raise ValueError(
                f"repetition_penalty must be in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}], "
                f"got {self.repetition_penalty}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def child(self, k: int) -> SamplingParams:
        """The k-th of n samples as a request of its own: n = 1 and seed + k (wrapped into the seed range), so
        the n choices differ yet stay reproducible."""
        seed = self.seed
        if seed is not None:
            seed = seed + k if seed + k <= SEED_MAX else (seed + k) % 2**64
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def adjusts_logits(self) -> bool:
        """Does a penalty or a logit bias change this request's logits before its choice?"""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @property
    def greedy(self) -> bool:
        """temperature 0, or so close to it (< 1e-5, as vLLM) that logits / temperature would overflow."""
        return self.temperature < GREEDY_BELOW


def _logit_bias(bias) -> dict[int, float]:
    """{token id: bias}, ids as ints (OpenAI's JSON keys are strings), biases finite and in [-100, 100]."""
    if not hasattr(bias, "items"):
        raise ValueError(f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        if isinstance(key, bool) or not (
            isinstance(key, numbers.Integral) or (isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key))
        ):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        token = int(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key}")
        out[token] = float(value)
    return out
