"""The scheduler -> model runner contract: which requests run this step and how many tokens each.

Prefill and decode are not modes: each scheduled request computes tokens
  all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
and samples a next token only when that range reaches the end of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so its logits give the next token."""
        return self.end == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.end]


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
