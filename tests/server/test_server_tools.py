"""Tool calling through the official `openai` client: required and named tool_choice give calls whose arguments
validate (the `jsonschema` package judges), streamed tool-call deltas join to the response that is not
streamed, tool results in the history are rendered and cached (a 5-turn agent loop with growing
cached_tokens), and bad tool requests are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from kvserve.server.tools import CLOSE, OPEN

from .conftest import API_KEY, MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["utc_offset"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _create(client, messages=QUESTION, **kw):
    return client.chat.completions.create(
        **{"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 80, **kw}
    )


def _check_calls(calls, allowed: set[str]) -> None:
    assert calls, "no tool call was returned"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls(client, parallel):
    r = _create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel)
    choice = r.choices[0]
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    if parallel:  # the small model keeps calling until max_tokens: the complete calls are returned
        assert choice.finish_reason in ("tool_calls", "length")
        assert len(choice.message.tool_calls) >= 1
    else:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_function_is_the_one_called(client, name):
    r = _create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
    calls = r.choices[0].message.tool_calls
    _check_calls(calls, {name})
    assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"


def test_seeded_sampling_calls_validate(client):
    for seed in range(3):
        r = _create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False)
        _check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})


def test_streamed_deltas_join_to_the_whole_response(client):
    kw = {"tools": TOOLS, "tool_choice": "required", "seed": 7, "temperature": 0.8, "max_tokens": 120}
    whole = _create(client, **kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in _create(client, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += tc.id or ""
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    joined = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert joined == [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(calls[i]["id"].startswith("call_") for i in calls)


def test_auto_and_none_answer_with_content(client):
    for choice in ("auto", "none"):
        r = _create(client, tools=TOOLS, tool_choice=choice, max_tokens=12)
        m = r.choices[0].message
        # the small model answers in prose here; whatever it says comes back, as text or as parsed calls
        assert m.content or m.tool_calls
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        if choice == "none":
            assert not m.tool_calls


def test_agent_loop_five_turns_with_growing_cache(client):
    """Each turn resends the whole history (tool calls and results included): the prefix cache serves it."""
    messages = [{"role": "system", "content": "You are a weather agent. Use the tools."}, *QUESTION]
    cached = []
    for turn in range(5):
        r = _create(client, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        call = r.choices[0].message.tool_calls[0]
        _check_calls([call], {"get_weather", "get_time"})
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append(r.choices[0].message.model_dump(exclude_none=True))  # as agents send it back
        result = {"temperature": 20 + turn, "unit": "celsius"}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
        messages.append({"role": "user", "content": f"And again, turn {turn + 2}?"})
    final = _create(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8)
    cached.append(final.usage.prompt_tokens_details.cached_tokens)
    assert all(b > a for a, b in zip(cached[1:], cached[2:])), cached  # turn 2 on, the history grows and is cached
    assert cached[-1] > 0.8 * final.usage.prompt_tokens


def test_history_renders_calls_and_results(server):
    """The default (Hermes) rendering of tools, calls and results, read back through /tokenize."""
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    with server.client() as c:
        r = c.post("/tokenize", json={"messages": messages, "tools": TOOLS, "return_token_strs": False})
        assert r.status_code == 200, r.text
        text = c.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "<tools>" in text and '"name": "get_weather"' in text and '"name": "get_time"' in text
    assert f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}' in text
    assert "<tool_response>\n21 C\n</tool_response>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x-": 1}}}],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "minProperties": "x"}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"messages": [{"role": "tool", "tool_call_id": "x"}]}, "messages"),  # no content
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    payload = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **body}
    with server.client() as c:
        r = c.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err


def test_unknown_fields_are_ignored_and_vllm_extras_work(server, caplog):
    extra = {"no_stop_trim": True, "separate_reasoning": True, "return_hidden_states": False, "foo": 1}
    payload = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    with server.client() as c:
        base = c.post("/v1/chat/completions", json=payload)
        with caplog.at_level("WARNING", logger="kvserve.server.protocol"):
            for _ in range(2):
                r = c.post("/v1/chat/completions", json={**payload, **extra})
                assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == base.json()["choices"][0]["message"]
    warned = [rec.getMessage() for rec in caplog.records if "ignoring the request field 'foo'" in rec.getMessage()]
    assert len(warned) <= 1  # once per name (another test may have warned about it already)


def test_known_unsupported_field_is_a_400(server):
    with server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "functions": [{"name": "f"}]},
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"


def test_continue_final_message(server):
    messages = [*QUESTION, {"role": "assistant", "content": "The weather in Paris is"}]
    with server.client() as c:
        r = c.post(
            "/tokenize",
            json={"messages": messages, "add_generation_prompt": False},
        )
        full = c.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
        assert full.rstrip().endswith("<|im_end|>")  # closed turn
        body = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": 4,
            "temperature": 0,
            "add_generation_prompt": False,
            "continue_final_message": True,
        }
        ok = c.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200, ok.text
        # the same tokens as a completion of the rendered text cut after the final message's content
        prompt = full[: full.rindex("The weather in Paris is") + len("The weather in Paris is")]
        ref = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert ok.json()["choices"][0]["message"]["content"] == ref.json()["choices"][0]["text"]
        bad = c.post("/v1/chat/completions", json={**body, "add_generation_prompt": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(server):
    with server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": QUESTION,
                "max_tokens": 2,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
        assert r.status_code == 200, r.text


def test_min_p_and_skip_special_tokens(server):
    base = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "seed": 3, "temperature": 1.0}
    with server.client() as c:
        greedy = c.post("/v1/completions", json={**base, "temperature": 0}).json()["choices"][0]["text"]
        # min_p = 1 keeps only the most likely token: sampling becomes greedy
        sampled = c.post("/v1/completions", json={**base, "min_p": 1.0}).json()["choices"][0]["text"]
        assert sampled == greedy
        bad = c.post("/v1/completions", json={**base, "min_p": 1.5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_p"
        ids = [1, 504, 3458, 2]  # <|im_start|> ... <|im_end|>: special tokens around text
        kept = c.post(
            "/v1/completions",
            json={**base, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "skip_special_tokens": False},
        )
        assert kept.status_code == 200, kept.text


def test_tool_requests_leave_no_block_behind(server):
    """Constrained tool calls, streamed and cancelled or not, give every KV block back."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for stream in (False, True):
        r = _create(client, tools=TOOLS, tool_choice="required", stream=stream)
        if stream:
            for _ in r:
                pass
    server.wait_idle()  # no request and no KV block held (kv_cache_usage_perc 0)
    assert not server.engine.has_unfinished_requests()
    server.engine.check_invariants()
    assert httpx.get(f"{server.base_url}/health").status_code == 200
