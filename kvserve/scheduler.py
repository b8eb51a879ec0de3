"""Scheduler: continuous batching with chunked prefill and preemption (no torch here).

One rule covers prefill and decode: each step, every running request asks for
num_tokens - num_computed_tokens more tokens, capped by the step's token budget (and by
long_prefill_token_threshold), and gets the KV blocks for them. Running requests go first, oldest first;
then waiting requests are admitted in arrival order while budget, seats (max_num_seqs) and blocks last.
A waiting request's prefix-cache hit is counted before admission, so a hit costs neither budget nor blocks
beyond the shared ones. A waiting request whose next uncached block a running request is computing right now
(the same hash: one system prompt or document arriving with several requests at once) waits until that block
is published and then reuses it, instead of computing the same KV beside it; requests behind it are admitted
meanwhile.

When a running request can't get a block, the newest running request is preempted: its blocks are freed
(they stay in the prefix cache until evicted) and it goes back to the front of the waiting queue, to be
recomputed later. Nothing fails for want of memory.

Models with recurrent layers set `recurrent` (RecurrentHooks, a RecurrentCacheManager): it cuts prefix hits to
the deepest recurrent-state checkpoint, ends prefill chunks at checkpoint positions, and frees a request's state slot
wherever its KV blocks are freed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from kvserve.batch import ScheduledRequest, SchedulerOutput
from kvserve.kv.cache_manager import ComputedBlocks, KVCacheManager
from kvserve.request import Request, RequestStatus

PROMPT_LOGPROBS_CHUNK = 512  # most prompt tokens scored (logits kept) per step, over all requests


class RecurrentHooks(Protocol):
    """What the scheduler asks of a model's recurrent state (kvserve/recurrent/manager.py implements it)."""

    def limit_prefix_hit(self, request: Request, computed: ComputedBlocks) -> ComputedBlocks:
        """Cut a KV prefix hit to a point the recurrent state can resume from."""

    def admitted(self, request: Request) -> None:
        """The request whose hit was just limited got its KV blocks."""

    def cut_chunk(self, request: Request, start: int, num_tokens: int) -> int:
        """Shorten a chunk so that it ends where the state is to be snapshotted."""

    def free(self, request: Request) -> None:
        """The request left the running set: give its state back."""


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    long_prefill_token_threshold: int | None = None


class Scheduler:
    def __init__(self, limits: SchedulerLimits, kv: KVCacheManager):
        self.limits = limits
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.recurrent: RecurrentHooks | None = None  # set for models with recurrent layers
        self._scored_left = PROMPT_LOGPROBS_CHUNK  # prompt tokens this step may still score (reset per step)

    # ------------------------------------------------------------------------------------------ queues
    def add_request(self, request: Request) -> None:
        """Queue a new request. Its KV needs must fit the pool when it runs alone (checked by the engine)."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is and release its blocks at once."""
        assert status.finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self._release(request)

    def _release(self, request: Request) -> None:
        """Give back everything the request holds: KV blocks and, for recurrent models, its state slot."""
        self.kv.free(request)
        if self.recurrent is not None:
            self.recurrent.free(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate their KV blocks."""
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens
        self._scored_left = PROMPT_LOGPROBS_CHUNK
        scheduled: list[ScheduledRequest] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, request.num_computed_tokens, budget)
            if n == 0:  # scoring its prompt, and this step's scored rows are spent
                i += 1
                continue
            drafts = 0
            if request.draft_token_ids and request.num_computed_tokens + n == request.num_tokens:
                drafts = min(len(request.draft_token_ids), budget - n)  # drafts count in the token budget
            if not self._allocate_or_preempt(request, n + drafts, out):
                break  # request itself was preempted; nothing after it runs either
            scheduled.append(ScheduledRequest(request, n + drafts, [], drafts))
            budget -= n + drafts
            i += 1

        if not out.preempted:
            budget = self._admit_waiting(budget, scheduled)

        for s in scheduled:
            s.block_ids = self.kv.block_ids(s.request)
        out.scheduled = scheduled
        return out

    def _chunk(self, request: Request, start: int, budget: int) -> int:
        n = min(request.num_tokens - start, budget)
        if self.limits.long_prefill_token_threshold is not None:
            n = min(n, self.limits.long_prefill_token_threshold)
        scoring = request.needs_prompt_logprobs  # every position's logits are kept: bound them per step
        if scoring:
            n = min(n, self._scored_left)
        if self.recurrent is not None and n > 0:
            n = self.recurrent.cut_chunk(request, start, n)
        if scoring:
            self._scored_left -= n  # what the chunk really scores, after a checkpoint cut
        return n

    def _allocate_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(request, n):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        inflight = self._inflight_blocks()
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting[i]
            # Blocks coming back from a lower tier: let this step's other requests run meanwhile.
            computed = self.kv.get_computed_blocks(request, wait=not scheduled)
            if computed.pending:
                break
            if self.recurrent is not None:
                computed = self.recurrent.limit_prefix_hit(request, computed)
            if self._computing_elsewhere(request, computed, inflight):
                i += 1  # its next block will be in the cache in a step or a few
                continue
            n = self._chunk(request, computed.num_tokens, budget)
            if n == 0 or not self.kv.allocate_slots(request, n, computed):
                break
            del self.waiting[i]
            if self.recurrent is not None:
                self.recurrent.admitted(request)
            if request.num_cached_tokens is None:
                request.num_cached_tokens = computed.num_tokens
                if not request.needs_prompt_logprobs:  # it did not look the cache up
                    self.kv.record_query(request, computed)
            request.num_computed_tokens = computed.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n, []))
            budget -= n
            if self.kv.enable_caching:
                inflight.update(self._prompt_blocks_to_compute(request))
        return budget

    def _prompt_blocks_to_compute(self, request: Request) -> list:
        """Hashes of the full prompt blocks a running request has still to compute (and will publish)."""
        bs = self.kv.block_size
        return request.block_hashes[request.num_computed_tokens // bs : request.num_prompt_tokens // bs]

    def _inflight_blocks(self) -> set:
        """Every running request's prompt blocks still to compute: a waiting request whose next block is one of
        them gets it from the cache once that request publishes it."""
        if not self.kv.enable_caching:
            return set()
        return {h for r in self.running for h in self._prompt_blocks_to_compute(r)}

    def _computing_elsewhere(self, request: Request, computed: ComputedBlocks, inflight: set) -> bool:
        if not inflight or request.needs_prompt_logprobs:
            return False
        k = computed.num_tokens // self.kv.block_size  # the first block it would compute
        max_blocks = (request.num_tokens - 1) // self.kv.block_size  # the last token is always computed
        return k < min(max_blocks, len(request.block_hashes)) and request.block_hashes[k] in inflight

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The step ran: advance each request's computed tokens and publish its newly full blocks."""
        for s in out.scheduled:
            r = s.request
            n = s.num_new_tokens - s.num_drafts  # accepted drafts count once appended (accept_drafts)
            prompt_end = min(r.num_computed_tokens + n, r.num_prompt_tokens)
            r.num_prompt_tokens_computed += max(0, prompt_end - r.num_computed_tokens)
            r.num_computed_tokens += n
            self.kv.cache_computed_blocks(r)

    def accept_drafts(self, request: Request, num_accepted: int) -> None:
        """The first num_accepted drafts the step computed are now the request's tokens: their KV counts, and
        blocks they fill are published. The KV written for rejected drafts lies past num_computed_tokens, so no
        block holding one is ever published; the next tokens overwrite those slots."""
        if num_accepted:
            request.num_computed_tokens += num_accepted
            self.kv.cache_computed_blocks(request)
