"""Workloads: deterministic for a seed, of the stated sizes (characters / CHARS_PER_TOKEN), sharing as designed."""

from __future__ import annotations

import json

import pytest

from kvserve.bench import workloads as w
from kvserve.bench.corpus import CHARS_PER_TOKEN
from kvserve.bench.workloads import WORKLOADS, BenchRequest, build_workload, load_trace
from tests.conftest import require_module


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def _text(req: BenchRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    calls = [c["function"]["arguments"] for m in req.messages for c in m.get("tool_calls") or ()]
    return "\n".join([*(m.get("content") or "" for m in req.messages), *calls])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_for_a_seed(name):
    a, b, c = build_workload(name, 24, 7), build_workload(name, 24, 7), build_workload(name, 24, 8)
    assert a == b and len(a) == 24
    assert [_text(r) for r in a] != [_text(r) for r in c]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_prose_not_token_soup(name):
    text = _text(build_workload(name, 8, 0)[-1])
    words = text.split()
    assert sum(x.strip(".,;:?!\"'(){}").isalpha() for x in words) / len(words) > 0.5  # tool logs are the least wordy
    assert ". " in text


def test_shared_system_prompt_sizes():
    reqs = build_workload("shared-system-prompt", 40, 0)
    systems = {r.messages[0]["content"] for r in reqs}
    assert len(systems) == 1
    assert 900 <= _tokens(systems.pop()) <= 1100
    questions = [r.messages[1]["content"] for r in reqs]
    assert all(_tokens(q) < 40 for q in questions) and len(set(questions)) > 20


def test_document_qa_sizes_and_sharing():
    reqs = build_workload("document-qa", 40, 0)
    assert all(not r.is_chat for r in reqs)
    groups = {r.group for r in reqs}
    assert len(groups) == w.NUM_DOCUMENTS
    for g in groups:
        prompts = [r.prompt for r in reqs if r.group == g]
        assert len(prompts) == 10
        doc = prompts[0].split("\n\nQuestion:")[0]
        assert all(p.startswith(doc) for p in prompts)
        assert 1800 <= _tokens(doc) <= 2200
    assert [r.group for r in reqs[:8]] != sorted(r.group for r in reqs[:8])  # interleaved


@pytest.mark.parametrize("name", ["multi-turn", "agent-loop"])
def test_histories_grow_and_depend_on_the_previous_turn(name):
    reqs = build_workload(name, 48, 0)
    for i, r in enumerate(reqs):
        if r.depends_on is None:
            continue
        parent = reqs[r.depends_on]
        assert r.depends_on < i and parent.group == r.group
        assert r.messages[: len(parent.messages)] == parent.messages
        assert len(r.messages) > len(parent.messages)
    assert sum(r.depends_on is None for r in reqs) == len({r.group for r in reqs})


def test_agent_loop_grows_long():
    reqs = build_workload("agent-loop", 32, 0)
    assert _tokens(_text(reqs[-1])) > 1500


def test_agent_loop_sends_real_tools_and_results():
    jsonschema = require_module("jsonschema")
    reqs = build_workload("agent-loop", 32, 0)
    assert all(r.tools == reqs[0].tools for r in reqs)  # the same tools each step: a shared prefix
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in reqs[0].tools}
    last = reqs[-1].messages
    calls = [m for m in last if m["role"] == "assistant"]
    results = [m for m in last if m["role"] == "tool"]
    assert len(calls) == len(results) >= 2
    for call, result in zip(calls, results, strict=True):
        (c,) = call["tool_calls"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])
        assert result["tool_call_id"] == c["id"] and result["content"]
    assert len({m["tool_calls"][0]["id"] for m in calls}) == len(calls)


def test_no_sharing_unique_from_the_first_block():
    reqs = build_workload("no-sharing", 50, 0)
    assert len({r.prompt[:24] for r in reqs}) == 50
    assert all(800 <= _tokens(r.prompt) <= 1100 for r in reqs)


def test_bad_names_and_sizes():
    with pytest.raises(ValueError):
        build_workload("nope", 4)
    with pytest.raises(ValueError):
        build_workload("no-sharing", 0)
    with pytest.raises(ValueError):
        BenchRequest()


def test_trace_loader(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        {"prompt": "hello", "arrival_time": 0.5, "max_tokens": 7},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": []}], "tools": [{"type": "function"}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b, c = load_trace(path)
    assert (a.prompt, a.arrival_time, a.max_tokens) == ("hello", 0.5, 7)
    assert b.messages == ({"role": "user", "content": "hi"},) and b.arrival_time is None
    assert c.tools == ({"type": "function"},) and c.messages[0]["tool_calls"] == []
    assert len(load_trace(path, limit=1)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        '{"prompt": 3}',
        '{"prompt": "a", "messages": []}',
        '{"prompt": "a", "max_tokens": 0}',
        '{"prompt": "a", "x": 1}',
        '{"messages": [{"role": "user"}]}',
        '{"prompt": "a", "tools": []}',
        '{"messages": [{"role": "user", "content": "a"}], "tools": {}}',
        "[1]",
        '{"prompt": "a", "arrival_time": -1}',
        "not json",
    ],
)
def test_trace_errors_name_the_line(tmp_path, bad):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "ok"}\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2"):
        load_trace(path)


def test_copy_edit_asks_for_its_own_text_again():
    reqs = build_workload("copy-edit", 6, 0)
    assert len({r.prompt for r in reqs}) == 6 and all(not r.is_chat for r in reqs)
    for r in reqs:
        text, ask = r.prompt.split("\n\nThe same text, unchanged except that ")
        body = text.removeprefix("Text:\n")
        assert 340 <= _tokens(body) <= 460
        old = ask.split("'")[1]
        assert old in body.split() and ask.endswith(" ".join(body.split()[:6]))  # the copy has begun
