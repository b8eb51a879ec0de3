"""Speculative decoding's bookkeeping (no model): drafters against brute force, the shared suffix index's bound
and tenant isolation, and a property test of the scheduler and KV cache under random draft/accept sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.model.sampler import SampleResult
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.scheduler import Scheduler, SchedulerLimits
from kvserve.spec.drafter import NGRAM_MAX, NGRAM_MIN, Drafter, NgramIndex, SharedSuffixIndex, SpeculativeConfig
from kvserve.spec.speculator import StepCost, confirmed, drafts_worth_verifying


def brute_force_lookup(tokens: list[int], k: int) -> list[int]:
    """The most recent earlier occurrence of the longest suffix (NGRAM_MAX..NGRAM_MIN) with a next token."""
    for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 6))
def test_prompt_lookup_matches_brute_force(tokens, k):
    index = NgramIndex()
    for i in range(0, len(tokens), 7):  # extended piecewise, as the engine does
        index.extend(tokens[i : i + 7])
    assert index.propose(k) == brute_force_lookup(tokens, k)


def test_speculative_spec_is_parsed_or_refused_by_name():
    assert SpeculativeConfig.parse("ngram:4") == SpeculativeConfig("ngram", 4)
    assert SpeculativeConfig.parse("suffix:8").method == "suffix"
    for bad in ("ngram", "ngram:0", "eagle:3", "suffix:x", "ngram:17"):
        with pytest.raises(ValueError, match="speculative must be ngram:K or suffix:K"):
            SpeculativeConfig.parse(bad)


def test_suffix_index_is_bounded_and_keeps_tenants_apart():
    shared = SharedSuffixIndex(k=3, max_entries=50)
    text = list(range(100, 140))
    shared.add("tenant-a", text)
    assert len(shared) == 50  # bounded: the oldest entries went first
    assert shared.propose("tenant-a", [136, 137], 3) == [138, 139]  # the newest n-grams stayed
    assert shared.propose("tenant-b", [136, 137], 3) == []  # another salt never sees tenant-a's text
    assert shared.propose(None, [136, 137], 3) == []


def test_suffix_drafter_proposes_from_earlier_requests_of_the_same_salt():
    d = Drafter(SpeculativeConfig("suffix", 4))
    d.add("a", [5, 6, 7, 8, 9, 10, 11], salt="t")
    d.finish("a")
    d.add("b", [1, 7, 8, 9], salt="t")
    assert d.propose("b", 4) == [10, 11]  # not in b's own text: from a's
    d.add("c", [1, 7, 8, 9], salt="other")
    assert d.propose("c", 4) == []
    n = Drafter(SpeculativeConfig("ngram", 4))
    n.add("a", [5, 6, 7, 8, 9, 10, 11], salt=None)
    n.finish("a")
    n.add("b", [1, 7, 8, 9], salt=None)
    assert n.propose("b", 4) == []  # prompt lookup sees only the request's own text


def test_acceptance_estimate_follows_what_verification_keeps():
    d = Drafter(SpeculativeConfig("ngram", 4))
    d.add("a", [1, 2, 1, 2, 1, 2], salt=None)
    assert d.acceptance("a") == 0.5  # no evidence yet
    for _ in range(10):
        d.verified("a", 4, 4)  # everything accepted
    assert d.acceptance("a") > 0.9
    for _ in range(10):
        d.verified("a", 4, 0)  # the text stopped repeating
    assert d.acceptance("a") < 0.4  # one failure per rejecting step: the geometric model's estimate


def test_drafts_are_cut_where_they_stop_paying_for_themselves():
    assert drafts_worth_verifying(0.9, 0.1, 8) == 8  # 0.9**8 = 0.43 > 0.1
    assert drafts_worth_verifying(0.5, 0.1, 8) == 3  # 0.5**3 = 0.125 > 0.1 >= 0.5**4
    assert drafts_worth_verifying(0.5, 0.6, 8) == 0
    assert drafts_worth_verifying(1.0, 0.99, 4) == 4


def test_step_cost_fit_recovers_a_linear_step_time():
    cost = StepCost()
    for tokens in [1, 8, 5, 40, 2, 17, 64, 3] * 30:
        cost.observe(tokens, 0.011 + 0.0014 * tokens)
    a, b = cost.fit()
    assert a == pytest.approx(0.011, rel=0.05) and b == pytest.approx(0.0014, rel=0.05)
    flat = StepCost()
    for tokens in [1, 8, 40] * 100:  # a GPU: rows are free
        flat.observe(tokens, 0.005)
    assert flat.fit()[1] == pytest.approx(0.0, abs=1e-6)


def test_confirmed_keeps_drafts_up_to_the_first_mismatch():
    s = [SampleResult(t, None, None) for t in (7, 8, 9, 4)]
    assert [r.token_id for r in confirmed([7, 8, 1], s)] == [7, 8, 9]
    assert [r.token_id for r in confirmed([3, 8, 9], s)] == [7]
    assert [r.token_id for r in confirmed([7, 8, 9], s)] == [7, 8, 9, 4]


BS = 4


def truth(rid: int, pos: int) -> int:
    """The token each request 'really' has at each output position (what a model would sample)."""
    return 10 + (pos * 7 + rid) % 5


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=40),
    num_requests=st.integers(1, 3),
    num_blocks=st.integers(6, 14),
)
def test_random_drafts_never_publish_a_rejected_token(plan, num_requests, num_blocks):
    """Each step every decoding request drafts k tokens, the first a of them right; the step 'writes' every
    scheduled token into a shadow of the KV slots. After each step: pool invariants hold, and every block in
    the prefix index holds, in the shadow, exactly the tokens it is indexed by (a rejected draft's slot never
    reaches the cache). At the end nothing leaks."""
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, BS)
    sched = Scheduler(SchedulerLimits(max_num_batched_tokens=16, max_num_seqs=4), kv)
    shadow: dict[tuple[int, int], int] = {}
    reqs = [Request(f"r{i}", [1, 2, 3, 4, 5, 6, i], SamplingParams(max_tokens=30)) for i in range(num_requests)]
    for r in reqs:
        sched.add_request(r)
    for step, (k, a) in enumerate(plan * 3):
        for r in sched.running:
            pos = r.num_output_tokens
            if r.num_computed_tokens == r.num_tokens - 1:
                good = [truth(int(r.request_id[1:]), pos + j) for j in range(min(a, k))]
                r.draft_token_ids = good + [99] * (k - len(good))
        out = sched.schedule()
        for s in out.scheduled:
            for p, tok in zip(range(s.start, s.end), s.token_ids, strict=True):
                shadow[(s.block_ids[p // BS], p % BS)] = tok
        samples_now = [s.samples for s in out.scheduled]  # before update_after_step moves `start`
        sched.update_after_step(out)
        for s, sampled in zip(out.scheduled, samples_now, strict=True):
            r = s.request
            if sampled:
                rid, pos = int(r.request_id[1:]), r.num_output_tokens
                samples = [SampleResult(truth(rid, pos + j), None, None) for j in range(s.num_drafts + 1)]
                kept = confirmed(r.draft_token_ids[: s.num_drafts], samples)
                for res in kept:
                    r.append_output_token(res.token_id)
                if r.num_output_tokens >= 30:
                    sched.finish_request(r, RequestStatus.FINISHED_LENGTH)
                else:
                    sched.accept_drafts(r, len(kept) - 1)
            r.draft_token_ids = []
        kv.check_invariants()
        for block in pool.blocks:
            if block.block_hash is not None:
                written = tuple(shadow.get((block.block_id, i)) for i in range(BS))
                assert written == block.token_ids, (step, block.block_id)
        for r in sched.running:  # what a running request computed is what its blocks hold
            ids = kv.block_ids(r)
            assert [shadow[(ids[p // BS], p % BS)] for p in range(r.num_computed_tokens)] == r.all_token_ids[
                : r.num_computed_tokens
            ]
    for r in list(sched.running) + list(sched.waiting):
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert pool.num_used_blocks == 0
    kv.check_invariants()
