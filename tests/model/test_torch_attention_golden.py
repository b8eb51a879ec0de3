"""The torch attention path (kvserve/model/attention.py, KVSERVE_ATTENTION=torch) against transformers.

On CPU the fused kernel runs attention wherever it builds, so test_golden.py's comparison with transformers
reaches the torch path only on machines without a C compiler, and its other tests compare the path only with
itself (cached = uncached, batched = alone). Here, in float32: greedy tokens equal transformers' generate token
for token, one prompt at a time with prompts that hit each other's cached blocks, then all of them again,
batched, served from the prefix cache.
"""

from __future__ import annotations

import pytest

import kvserve.model.attention as attention
from kvserve import LLM, SamplingParams
from tests.conftest import transformers_greedy
from tests.model.test_golden import DOC, PROMPTS

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
QUESTIONS = ["\nQ: What does the pool evict first?\nA:", "\nQ: When is a block never evicted?\nA:"]
CASES = [PROMPTS[0], PROMPTS[2], PROMPTS[3]] + [DOC + q for q in QUESTIONS]  # the last shares DOC's blocks
BLOCK = 16


@pytest.fixture(scope="module")
def hf_greedy(hf_model, ours) -> list[list[int]]:
    """transformers' greedy continuation of each case, one at a time."""
    return [transformers_greedy(hf_model, ours.tokenizer.encode(p), MAX_TOKENS) for p in CASES]


def test_torch_attention_greedy_matches_transformers_cold_and_cached(ours, hf_greedy, attention_path):
    monkeypatch = attention_path("torch")  # before the engine is built: the path is chosen once per engine
    torch_path_calls = []
    attend = attention._attend_group

    def counting(*args, **kwargs):
        torch_path_calls.append(1)
        return attend(*args, **kwargs)

    monkeypatch.setattr(attention, "_attend_group", counting)
    llm = LLM(loaded=ours, dtype="float32", enable_prefix_caching=True, num_kv_blocks=256)
    ids = [ours.tokenizer.encode(p) for p in CASES]

    cold = [llm.generate(p, GREEDY)[0] for p in CASES]
    assert torch_path_calls, "attention did not run on the torch path"
    assert [o.outputs[0].token_ids for o in cold] == hf_greedy
    # the second document question found the first's blocks: every full block of their common prefix
    common = next(i for i, (x, y) in enumerate(zip(ids[-2], ids[-1])) if x != y)
    assert [o.num_cached_tokens for o in cold] == [0] * (len(CASES) - 1) + [common // BLOCK * BLOCK]
    assert common // BLOCK >= 5

    warm = llm.generate(CASES, GREEDY)  # all again, batched: each prompt's full blocks from the cache
    assert [o.outputs[0].token_ids for o in warm] == hf_greedy
    assert [o.num_cached_tokens for o in warm] == [(len(i) - 1) // BLOCK * BLOCK for i in ids]  # last one computed
    assert llm.engine.get_stats().num_used_blocks == 0
