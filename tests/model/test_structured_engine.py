"""Structured outputs in the engine: compiled grammars are cached by content, and a constraint at a dead end
fails its request alone while the rest of the batch goes on."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import InvalidRequestError
from kvserve.sampling_params import StructuredOutputsParams


@pytest.fixture(scope="module")
def llm(ours) -> LLM:
    return LLM(loaded=ours, dtype="float32", num_kv_blocks=128)


def test_the_same_schema_is_compiled_once(llm):
    compiler = llm.engine._structured.compiler
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    b = {"properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "type": "object"}  # same, reordered
    misses = compiler.misses
    for schema in (a, b, a):
        llm.generate(
            "JSON:",
            SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(json=schema)),
        )
    assert compiler.misses == misses + 1 and compiler.hits >= 2


def test_a_bad_constraint_queues_nothing(llm):
    with pytest.raises(InvalidRequestError, match="structured_outputs: the regex does not compile"):
        llm.generate(  # one bad request among good ones: none is queued
            ["a", "b"],
            [
                SamplingParams(max_tokens=4),
                SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(unclosed")),
            ],
        )
    assert not llm.engine.has_unfinished_requests() and llm.engine.get_stats().num_used_blocks == 0


def test_a_dead_end_fails_its_request_alone(llm):
    engine = llm.engine
    constrained = SamplingParams(
        temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex="[0-9]+")
    )
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = llm.generate("Count: 1, 2,", free)[0].outputs[0].token_ids
    dead = engine.add_request("Digits:", constrained)
    other = engine.add_request("Count: 1, 2,", free)
    engine._structured.accept(dead, [llm.tokenizer.encode("abc", add_special_tokens=False)[0]])  # off the grammar
    outputs: dict[str, list] = {dead: [], other: []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outputs[o.request_id].append(o)
    end = outputs[dead][-1]
    assert end.finished and end.outputs[0].finish_reason == "error" and "structured output" in end.error
    assert [t for o in outputs[other] for t in o.outputs[0].token_ids] == reference
    assert engine.get_stats().num_used_blocks == 0
