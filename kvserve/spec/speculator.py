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

# Verification is nearly free while a step's decode rows stay few (a decode step streams the weights once
# whatever its rows); past this many rows (decodes + drafts) drafts are cut so the step stays memory-bound.
MAX_VERIFY_ROWS = 32


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
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_position = [0] * config.k

    def add(self, request: Request) -> None:
        if request.sampling_params.speculative:
            self.drafter.add(request.request_id, request.all_token_ids, request.cache_salt)

    def propose(self, running: Sequence[Request]) -> None:
        """Set each decoding request's drafts for the next step (none for requests that opted out, are still
        in prefill, or are short of min_tokens, whose EOS ban changes with the position)."""
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        rows_per_request = max(1, MAX_VERIFY_ROWS // max(1, len(decoding)))
        for r in running:
            r.draft_token_ids = []
        for r in decoding:
            p = r.sampling_params
            if r.request_id not in self.drafter or r.num_output_tokens < p.min_tokens:
                continue
            room = [self.config.k, rows_per_request - 1]
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

    def finish(self, request_id: str) -> None:
        self.drafter.finish(request_id)
