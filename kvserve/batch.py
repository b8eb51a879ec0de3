"""The scheduler -> model runner contract: which requests run this step and how many tokens each.

Prefill and decode are not modes: each scheduled request computes tokens
  all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
and samples a next token only when that range reaches the end of its tokens. With speculative decoding the
range may run on past the end into the request's draft tokens (the last num_drafts of the chunk), which the
same forward pass verifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # drafts included
    block_ids: list[int]
    num_drafts: int = 0

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so its logits give the next token."""
        return self.end - self.num_drafts == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        known = self.request.all_token_ids[self.start : self.end - self.num_drafts]
        return known + self.request.draft_token_ids[: self.num_drafts] if self.num_drafts else known


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
