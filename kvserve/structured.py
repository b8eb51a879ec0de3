"""Structured outputs: constrained decoding on llguidance (the grammar engine vLLM, SGLang and llama.cpp use).

Why llguidance: it has no dependencies (one Rust wheel, no torch, transformers or triton pulled in, unlike
xgrammar), computes a token mask on the CPU in tens of microseconds with lazily built lexers (no per-schema
compilation of the whole vocabulary), and takes JSON schemas, regexes, choices and Lark or GBNF grammars.

A request's StructuredOutputsParams is compiled to an llguidance grammar once per distinct content (cached,
LRU): the engine never compiles the same schema twice. Each constrained request owns a matcher; before a
step the engine asks it for the mask of allowed next tokens (applied in the sampler to that row only, so free
rows in the same batch are untouched), and after the step feeds it the token chosen. A matcher that allows
no token (a grammar dead end) fails that request alone with a clear error.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import numpy as np
import torch

from kvserve.errors import InvalidRequestError
from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept


class GrammarCompiler:
    """StructuredOutputsParams -> a validated llguidance grammar, cached by content; matchers over it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:  # about a second for a 50k vocabulary: built at the first constrained request
            self._lltok = llguidance.LLTokenizer(
                self._tokenizer.backend_json(), n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._lltok

    def compile(self, spec: StructuredOutputsParams, param: str = "structured_outputs") -> str:
        """The grammar, or InvalidRequestError naming `param` when it does not compile."""
        key = (spec.kind, _source(spec))
        grammar = self._cache.get(key)
        if grammar is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return grammar
        self.misses += 1
        try:
            grammar = _grammar(spec)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"{param}: invalid {spec.kind}: {e}", param=param) from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise InvalidRequestError(f"{param}: the {spec.kind} does not compile: {error}", param=param)
        self._cache[key] = grammar
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    def matcher(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0), self.vocab_size)


def _source(spec: StructuredOutputsParams) -> str:
    if spec.kind == "json":
        return spec.json if isinstance(spec.json, str) else json.dumps(spec.json, sort_keys=True)
    if spec.kind == "choice":
        return json.dumps(list(spec.choice or ()))
    if spec.kind == "json_object":
        return ""
    return str(getattr(spec, spec.kind))


def _grammar(spec: StructuredOutputsParams) -> str:
    if spec.kind == "json":
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex or "")
    if spec.kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(list(spec.choice or ())))
    return llguidance.grammar_from("grammar", spec.grammar or "")


class Constraint:
    """One request's matcher: the allowed next tokens, and the tokens chosen fed back."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m, self._vocab = matcher, vocab_size

    def allowed(self) -> torch.Tensor | None:
        """A bool mask over the vocabulary, or None when nothing may follow (the request must end)."""
        if self._m.is_error():
            return None
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool)
        return torch.from_numpy(mask) if mask.any() else None

    def accept(self, token_id: int) -> None:
        self._m.consume_token(token_id)

    @property
    def error(self) -> str:
        return self._m.get_error() or "the constraint allows no next token"


class Constraints:
    """The engine's constrained requests: their matchers, each step's masks, the tokens fed back."""

    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self._by_request: dict[str, Constraint] = {}

    def add(self, request_id: str, grammar: str) -> None:
        self._by_request[request_id] = self.compiler.matcher(grammar)

    def masks(self, request_ids: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Masks of these sampling requests that are constrained, and those whose constraint is at a dead end
        (with the reason): they are failed after the step instead of sampling."""
        masks: dict[str, torch.Tensor] = {}
        dead: dict[str, str] = {}
        for rid in request_ids if self._by_request else ():
            c = self._by_request.get(rid)
            if c is None:
                continue
            mask = c.allowed()
            if mask is None:
                dead[rid] = c.error
            else:
                masks[rid] = mask
        return masks, dead

    def accept(self, request_id: str, tokens: Sequence[int]) -> None:
        c = self._by_request.get(request_id)
        if c is not None:
            for t in tokens:
                c.accept(t)

    def release(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_request

    def __len__(self) -> int:
        return len(self._by_request)
