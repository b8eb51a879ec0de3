"""Speculative decoding never changes a token: with --speculative ngram:K or suffix:K the engine gives the same
tokens and the same logprobs, bit for bit, as without, greedy and seeded, alone and batched, with prefix
caching, chunked prefill and preemption in play, in float32 and bfloat16. The reference is the engine with
speculation off, itself checked against transformers by test_golden.py."""

from __future__ import annotations

import pytest

from bench.golden_inputs import DOC
from kvserve import LLM, SamplingParams

COPY = "def area(w, h):\n    return w * h\n\n# the same function again, unchanged:\ndef area(w, h):\n"
PROMPTS = [
    DOC + "\nRepeat the first sentence of the text above word for word:",
    COPY,
    "Count from one: 1, 2, 3, 4, 5, 6, 7, 8,",
    "Write a short poem about the sea.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=11, max_tokens=48, ignore_eos=True, logprobs=0)


def _same(reference, outputs):
    for ref, out in zip(reference, outputs, strict=True):
        a, b = ref.outputs[0], out.outputs[0]
        assert b.token_ids == a.token_ids
        assert b.logprobs == a.logprobs  # floats compared exactly
        assert b.top_logprobs == a.top_logprobs
        assert b.text == a.text


@pytest.fixture(autouse=True)
def _steady_step_cost(monkeypatch):
    """How many drafts a step verifies follows the measured step times (kvserve/spec/speculator.py); here they
    keep the prior's CPU shape, so a machine loaded by something else cannot talk the speculator out of
    drafting and leave the path under test unexercised (these tests check tokens, not speed)."""
    from kvserve.spec.speculator import Speculator

    monkeypatch.setattr(Speculator, "observe_step", lambda self, tokens, seconds: None)


def _spec(llm: LLM):
    stats = llm.engine.get_stats().spec_decode
    assert stats is not None
    return stats


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["ngram:4", "suffix:3"])
def test_speculation_gives_the_plain_tokens_and_logprobs(ours, dtype, method):
    plain = LLM(loaded=ours, dtype=dtype, num_kv_blocks=256)
    spec = LLM(loaded=ours, dtype=dtype, num_kv_blocks=256, speculative=method)
    for params in (GREEDY, SEEDED):
        reference = plain.generate(PROMPTS, params)
        _same(reference, spec.generate(PROMPTS, params))  # batched
        _same(reference[:1], spec.generate(PROMPTS[:1], params))  # alone, and its prefix now cached
        _same(reference[1:2], spec.generate(PROMPTS[1:2], params))
    stats = _spec(spec)
    assert stats.accepted_tokens > 0  # drafts were verified and kept, so the path under test ran
    assert stats.draft_tokens > stats.accepted_tokens  # and some were rejected and rolled back
    assert sum(stats.accepted_per_position) == stats.accepted_tokens
    spec.engine.check_invariants()
    assert spec.engine.get_stats().num_used_blocks == 0


def test_chunked_prefill_preemption_and_cache_hits_change_nothing(ours):
    """A pool too small for the batch (preemptions), a small step budget (chunked prefill, drafts cut by the
    budget), and the same prompts twice (prefix hits on blocks that drafts helped fill)."""
    kw = dict(loaded=ours, dtype="float32", num_kv_blocks=40, max_num_batched_tokens=48)
    plain, spec = LLM(**kw), LLM(**kw, speculative="ngram:6")
    reference = plain.generate(PROMPTS * 2, GREEDY)
    _same(reference, spec.generate(PROMPTS * 2, GREEDY))
    _same(reference, spec.generate(PROMPTS * 2, GREEDY))
    stats = spec.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_hits > 0 and stats.spec_decode.accepted_tokens > 0
    spec.engine.check_invariants()


def test_stops_inside_accepted_drafts_end_the_request_there(ours):
    """A stop string, a stop token or max_tokens that falls among a step's confirmed tokens ends the output
    exactly where plain decoding ends it."""
    plain = LLM(loaded=ours, dtype="float32", num_kv_blocks=128)
    spec = LLM(loaded=ours, dtype="float32", num_kv_blocks=128, speculative="ngram:8")
    full = plain.generate(PROMPTS[2], GREEDY)[0].outputs[0]
    cases = [
        SamplingParams(temperature=0, max_tokens=13),
        SamplingParams(temperature=0, max_tokens=40, stop=[full.text[20:24]]),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[full.token_ids[17]]),
    ]
    for params in cases:
        _same(plain.generate(PROMPTS[2], params), spec.generate(PROMPTS[2], params))
    assert _spec(spec).accepted_tokens > 0


def test_a_request_can_opt_out_and_gets_the_same_tokens(ours):
    spec = LLM(loaded=ours, dtype="float32", num_kv_blocks=128, speculative="ngram:4")
    opted_out = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0, speculative=False)
    out = spec.generate(PROMPTS[1], opted_out)
    assert _spec(spec).draft_tokens == 0
    on = spec.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0))
    assert _spec(spec).draft_tokens > 0
    _same(out, on)


def test_speculation_is_refused_where_it_cannot_be_exact(ours):
    with pytest.raises(ValueError, match="speculative must be ngram:K or suffix:K"):
        LLM(loaded=ours, dtype="float32", num_kv_blocks=32, speculative="eagle:2")
