"""Draft tokens for speculative decoding, from text seen before (no draft model, no torch).

  ngram:K   prompt lookup: the most recent earlier occurrence of the request's last n tokens (n = 4, then 3,
            then 2) in its own prompt and output proposes the up to K tokens that followed it.
  suffix:K  the same over the request's own tokens first; where they have no match, a shared index of the
            n-grams of earlier requests' prompts and outputs (keyed by cache salt, so tenants never see each
            other's text; bounded in entries, least recently used out first) proposes what followed them last.

Per request the drafter estimates how likely a draft is to be accepted (each draft given the ones before it:
accepted drafts are successes, the first rejected one a failure, counts decaying by 0.8 a step); the engine
drafts only as many tokens as that makes worth verifying (kvserve/spec/speculator.py). Drafts never change a
token: the engine verifies them (kvserve/engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

NGRAM_MAX, NGRAM_MIN = 4, 2  # lengths of the suffix matched, longest first
METHODS = ("ngram", "suffix")
SUFFIX_MAX_ENTRIES = 1 << 18  # shared n-gram entries (about 60 MB at K = 4)
DECAY = 0.8  # per verified step, of the acceptance counts


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    k: int

    @classmethod
    def parse(cls, spec: str) -> SpeculativeConfig:
        """'ngram:K' or 'suffix:K' (K in 1..16)."""
        method, _, k = spec.partition(":")
        if method not in METHODS or not k.isdigit() or not 1 <= int(k) <= 16:
            raise ValueError(f"speculative must be ngram:K or suffix:K with K in 1..16, got {spec!r}")
        return cls(method, int(k))


class NgramIndex:
    """Where each n-gram of a token sequence last occurred with a known next token: O(1) per token."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            i = len(self.tokens)
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if i >= n:
                    self._last[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        toks = self.tokens
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(toks) < n:
                continue
            j = self._last.get(tuple(toks[-n:]))
            if j is not None:
                return toks[j : j + k]
        return []


class SharedSuffixIndex:
    """n-gram -> the tokens that followed it in a finished request, per cache salt, LRU-bounded."""

    def __init__(self, k: int, max_entries: int = SUFFIX_MAX_ENTRIES) -> None:
        self.k = k
        self.max_entries = max_entries
        self._map: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def add(self, salt: str | None, tokens: list[int]) -> None:
        m, k = self._map, self.k
        for i in range(NGRAM_MIN, len(tokens)):
            follow = tuple(tokens[i : i + k])
            for n in range(NGRAM_MIN, min(NGRAM_MAX, i) + 1):
                key = (salt, *tokens[i - n : i])
                m[key] = follow
                m.move_to_end(key)
        while len(m) > self.max_entries:
            m.popitem(last=False)

    def propose(self, salt: str | None, tokens: list[int], k: int) -> list[int]:
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(tokens) < n:
                continue
            key = (salt, *tokens[-n:])
            follow = self._map.get(key)
            if follow:
                self._map.move_to_end(key)
                return list(follow[:k])
        return []


@dataclass
class _Tracked:
    index: NgramIndex
    salt: str | None
    accepted: float = 0.0  # decayed counts of accepted drafts ...
    rejected: float = 0.0  # ... and of steps that rejected one


class Drafter:
    """Per-request n-gram indexes, the shared suffix index, and the adaptive back-off."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.shared = SharedSuffixIndex(config.k) if config.method == "suffix" else None
        self._requests: dict[str, _Tracked] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, token_ids: list[int], salt: str | None) -> None:
        index = NgramIndex()
        index.extend(token_ids)
        self._requests[request_id] = _Tracked(index, salt)

    def extend(self, request_id: str, tokens: list[int]) -> None:
        self._requests[request_id].index.extend(tokens)

    def propose(self, request_id: str, k: int) -> list[int]:
        """Up to k draft tokens to follow the request's tokens."""
        t = self._requests[request_id]
        if k <= 0:
            return []
        drafts = t.index.propose(k)
        if not drafts and self.shared is not None:
            drafts = self.shared.propose(t.salt, t.index.tokens, k)
        return drafts

    def verified(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """A step checked num_drafted drafts of the request and accepted the first num_accepted."""
        t = self._requests.get(request_id)
        if t is None or num_drafted == 0:
            return
        t.accepted = DECAY * t.accepted + num_accepted
        t.rejected = DECAY * t.rejected + (num_accepted < num_drafted)

    def acceptance(self, request_id: str) -> float:
        """The chance that a draft is accepted given the drafts before it were (1/2 before any evidence)."""
        t = self._requests[request_id]
        return (t.accepted + 1) / (t.accepted + t.rejected + 2)

    def finish(self, request_id: str) -> None:
        t = self._requests.pop(request_id, None)
        if t is not None and self.shared is not None:
            self.shared.add(t.salt, t.index.tokens)
