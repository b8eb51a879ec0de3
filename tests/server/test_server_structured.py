"""Structured outputs through the official `openai` client: every output parses and validates (the `jsonschema`
package is the judge), regex and choice outputs match, bad constraints are 400s naming the field, and a
constrained row changes nothing for the free rows beside it."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from kvserve import LLM, SamplingParams
from kvserve.sampling_params import StructuredOutputsParams

from .conftest import API_KEY, ENGINE_DEFAULTS, MODEL

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["sunny", "rainy", "windy"]}, "maxItems": 3},
        },
        "required": ["city", "location", "tags"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=120, **kw
    )


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_validate(client, name, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    r = _chat(client, f"Describe a {name} as JSON.", response_format=fmt, temperature=temperature, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_gives_parseable_json(client):
    prompt = "Give me a JSON object with the keys name and age of a cat."
    r = _chat(client, prompt, response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_regex_choice_and_grammar_through_structured_outputs(client):
    regex = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3}!"
    out = client.completions.create(
        model=MODEL, prompt="Tell me an age:", max_tokens=30, temperature=0.8, seed=1,
        extra_body={"structured_outputs": {"regex": regex}},
    ).choices[0].text  # fmt: skip
    assert re.fullmatch(regex, out), out
    choices = ["positive", "negative", "neutral"]
    out = client.completions.create(
        model=MODEL, prompt="The review 'I loved it' is", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"choice": choices}},
    ).choices[0].text  # fmt: skip
    assert out in choices
    grammar = 'root ::= "(" [0-9]+ " + " [0-9]+ ")"'  # llama.cpp's GBNF
    out = client.completions.create(
        model=MODEL, prompt="A sum:", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    ).choices[0].text  # fmt: skip
    assert re.fullmatch(r"\([0-9]+ \+ [0-9]+\)", out), out


def test_streamed_constrained_output_joins_to_the_whole_one(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}
    whole = _chat(client, "A person:", response_format=fmt, temperature=0).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in _chat(client, "A person:", response_format=fmt, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "Hi", temperature=0, extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    server.wait_idle()  # nothing was queued, no block leaked


def test_a_constrained_row_changes_nothing_for_free_rows(ours):
    """Free rows batched with constrained ones keep their tokens and logprobs bit for bit, and a constrained
    request gives the same tokens alone and batched."""
    llm = LLM(loaded=ours, **ENGINE_DEFAULTS)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.9, seed=4, max_tokens=24, ignore_eos=True, logprobs=1)
    constrained = SamplingParams(
        temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMAS["person"])
    )
    prompts = ["The capital of France is", "Once upon a time", "A person as JSON:"]
    alone = [llm.generate(p, s)[0].outputs[0] for p, s in zip(prompts, [free, seeded, constrained], strict=True)]
    batched = [o.outputs[0] for o in llm.generate(prompts, [free, seeded, constrained])]
    for a, b in zip(alone, batched, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    jsonschema.validate(json.loads(batched[2].text), SCHEMAS["person"])
