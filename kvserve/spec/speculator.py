"""The engine's side of speculative decoding: which requests draft how many tokens each step, which drafts a
step's samples confirm, and the counters.

Verification is exact by construction: the step computes the request's last token and its drafts in one
chunk, and samples at every position as plain decoding would (greedy argmax, or Gumbel-max keyed by
(seed, position): kvserve/model/sampler.py); the batch-invariant kernels give each position the same logits
as a one-token decode step. A draft is kept iff it equals the token sampled at its position, and the token
after the last kept draft is sampled too, so 1 to K + 1 tokens come out of each step, the very tokens plain
decoding would have produced one step at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.model.sampler import SampleResult
from kvserve.request import Request
from kvserve.spec.drafter import Drafter, SpeculativeConfig

PROBE_EVERY = 16  # a request drafting nothing drafts one token this often, to re-estimate its acceptance


class StepCost:
    """Step time as a + b * tokens, fitted online by least squares with exponential forgetting. A decode step
    reads all the weights (a) and each token adds its compute (b); drafts pay only b. Starts from a prior
    (a step of 1 token in 10 ms, of 33 tokens in 50 ms: a CPU's shape), which real steps soon outweigh."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        for tokens, seconds in ((1, 0.010), (33, 0.050)):
            self.observe(tokens, seconds, weight=2.0)

    def observe(self, tokens: int, seconds: float, weight: float = 1.0) -> None:
        d = self.decay
        self._n = d * self._n + weight
        self._x = d * self._x + weight * tokens
        self._y = d * self._y + weight * seconds
        self._xx = d * self._xx + weight * tokens * tokens
        self._xy = d * self._xy + weight * tokens * seconds

    def fit(self) -> tuple[float, float]:
        """(a, b): seconds per step and per token, each >= 0."""
        var = self._n * self._xx - self._x * self._x
        b = (self._n * self._xy - self._x * self._y) / var if var > 1e-12 else 0.0
        b = max(b, 0.0)
        a = max((self._y - b * self._x) / self._n, 1e-6)
        return a, b


def drafts_worth_verifying(acceptance: float, threshold: float, k: int) -> int:
    """How many drafts pay for themselves: draft j (1-based) is kept with probability acceptance**j (each one
    needs the ones before it) and costs one token of compute, so it is worth it while acceptance**j exceeds
    threshold = (one token's compute) / (the step's time per token it yields without drafts)."""
    d = 0
    gain = 1.0
    while d < k:
        gain *= acceptance
        if gain <= threshold:
            break
        d += 1
    return d


def confirmed(drafts: Sequence[int], samples: Sequence[SampleResult]) -> list[SampleResult]:
    """The tokens a verified chunk yields: samples[0], then samples[j + 1] for each leading draft j that equals
    samples[j] (samples has len(drafts) + 1 entries)."""
    out = [samples[0]]
    for j, draft in enumerate(drafts):
        if samples[j].token_id != draft:
            break
        out.append(samples[j + 1])
    return out


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.drafter = Drafter(config)
        self.cost = StepCost()
        self._steps = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_position = [0] * config.k

    def add(self, request: Request) -> None:
        p = request.sampling_params
        if p.speculative and p.structured_outputs is None:  # a constrained request's matcher has no rollback here
            self.drafter.add(request.request_id, request.all_token_ids, request.cache_salt)

    def propose(self, running: Sequence[Request]) -> None:
        """Set each decoding request's drafts for the next step (none for requests that opted out, are still
        in prefill, or are short of min_tokens, whose EOS ban changes with the position). How many: as many as
        pay for themselves given the request's acceptance so far and what a token costs in a step of this
        size (StepCost), so drafting backs off as the batch grows and verification stops being free."""
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        for r in running:
            r.draft_token_ids = []
        if not decoding:
            return
        self._steps += 1
        a, b = self.cost.fit()
        n = len(decoding)
        threshold = b * n / (a + b * n)  # one token's compute over the step's time per decoded token
        for r in decoding:
            p = r.sampling_params
            if r.request_id not in self.drafter or r.num_output_tokens < p.min_tokens:
                continue
            worth = drafts_worth_verifying(self.drafter.acceptance(r.request_id), threshold, self.config.k)
            if worth == 0 and self._steps % PROBE_EVERY == hash(r.request_id) % PROBE_EVERY:
                worth = 1  # probe now and then: acceptance changes along a text
            room = [worth]
            if p.max_tokens is not None:
                room.append(p.max_tokens - r.num_output_tokens - 1)  # the step yields one token more
            if r.max_model_len is not None:
                room.append(r.max_model_len - r.num_tokens - 1)
            r.draft_token_ids = self.drafter.propose(r.request_id, min(room))

    def record(self, request: Request, num_drafts: int, appended: Sequence[int]) -> int:
        """A step verified num_drafts drafts of the request and appended these tokens; returns how many drafts
        were accepted (their KV is now the request's)."""
        accepted = max(0, len(appended) - 1) if num_drafts else 0
        self.draft_tokens += num_drafts
        self.accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_position[j] += 1
        if request.request_id in self.drafter:
            self.drafter.extend(request.request_id, list(appended))
            self.drafter.verified(request.request_id, num_drafts, accepted)
        return accepted

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step computed this many tokens (drafts included) in this time."""
        self.cost.observe(tokens, seconds)

    def finish(self, request_id: str) -> None:
        self.drafter.finish(request_id)
