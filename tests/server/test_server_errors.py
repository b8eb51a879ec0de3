"""Malformed and refused requests: always a 4xx with an OpenAI error body, never a 5xx, never a hang."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import API_KEY, MODEL

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]

# (path, body: dict is sent as JSON, bytes as is, expected status, expected param or None)
CASES = [
    (COMP, b'{"model": "smollm2-135m", "prompt": ', 400, None),
    (COMP, b"[1, 2, 3]", 400, None),
    (COMP, b"\xff\xfe not utf-8", 400, None),
    (COMP, b"", 400, None),
    (COMP, {"prompt": 123}, 400, "prompt"),
    (COMP, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMP, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    (COMP, {"prompt": "x", "n": 1.5}, 400, "n"),
    (COMP, {"prompt": [1, "a"]}, 400, "prompt"),
    (COMP, {"prompt": "x", "suffix": "y"}, 400, "suffix"),  # known to OpenAI, not implemented
    (COMP, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (COMP, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMP, {"prompt": "x", "n": 0}, 400, "n"),
    (COMP, {"prompt": "x", "n": 1000}, 400, "n"),
    (COMP, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (COMP, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (COMP, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMP, {"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, 400, "stream_options.bogus"),
    (COMP, {"prompt": "x", "echo": "yes"}, 400, "echo"),
    (COMP, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (COMP, {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    (COMP, {"prompt": "x", "logit_bias": {"50256": 101}}, 400, "logit_bias"),
    (COMP, {"prompt": "x", "logit_bias": {"one": 1}}, 400, "logit_bias"),
    (COMP, {"prompt": "x", "logit_bias": {"1": "high"}}, 400, "logit_bias.1"),
    (COMP, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, None),  # outside the vocabulary
    (COMP, {"prompt": "x", "logit_bias": [1, 2]}, 400, "logit_bias"),
    (COMP, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    (COMP, {"prompt": "x", "frequency_penalty": -2.01}, 400, "frequency_penalty"),
    (COMP, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMP, {"prompt": "x", "temperature": 0.5, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),  # overflow
    (COMP, {"prompt": "x", "repetition_penalty": 1e300}, 400, "repetition_penalty"),
    (COMP, {"prompt": "x", "logit_bias": {"1_0": 1}}, 400, "logit_bias"),  # int() would read 10
    (COMP, {"prompt": [1, -1, 5], "echo": True}, 400, None),  # decoding it for the echo would raise
    (COMP, {"prompt": [[1, 2], [10**12]], "echo": True, "logprobs": 1}, 400, None),
    (COMP, {"prompt": ""}, 400, None),
    (COMP, {"prompt": []}, 400, "prompt"),
    (COMP, {"prompt": [[]]}, 400, None),
    (COMP, {"prompt": [10**9]}, 400, None),
    (COMP, {"prompt": [-1]}, 400, None),
    (COMP, {"prompt": "hello " * 9000}, 400, None),
    (COMP, {"prompt": [42] * 8192}, 400, None),
    (COMP, {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": 8192}, 400, "max_tokens"),
    (COMP, {"prompt": ["a"] * 10, "n": 64, "max_tokens": 1}, 400, None),  # 640 sequences: more than ever queue
    (COMP, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (COMP, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),  # nesting past the parser's limit
    (COMP, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),  # past Python's int digits limit
    (COMP, {"prompt": "hi \ud800"}, 400, None),  # a lone surrogate: no UTF-8 text, no tokenizer takes it
    (COMP, {"prompt": ["ok", "\udc00"]}, 400, None),
    (COMP, {"prompt": "hi", "model": "\ud800"}, 400, None),
    (CHAT, {"messages": [{"role": "user", "content": "\udc00"}]}, 400, None),
    (COMP, {"prompt": "x", "temperature": 1, "seed": -(2**63) - 1}, 400, "seed"),  # torch's seed range
    (COMP, {"prompt": "x", "temperature": 1, "seed": 10**20}, 400, "seed"),
    (COMP, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, None),
    (COMP, {"prompt": "x", "stop_token_ids": [10**8]}, 400, None),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {"messages": [{"role": "function", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    (CHAT, {"messages": MSGS, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    (CHAT, {"messages": MSGS, "functions": [{"name": "f"}]}, 400, "functions"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (
        CHAT,
        {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
        400,
        "response_format.json_schema.schema",
    ),
    (CHAT, {"messages": MSGS, "logit_bias": {"1": -100.5}}, 400, "logit_bias"),
    (CHAT, {"messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSGS, "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 9000}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSGS, "cache_salt": 7}, 400, "cache_salt"),
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, None),
    (CHAT, {"messages": MSGS, "model": "nope"}, 404, "model"),
]


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http(server):
    with server.client(timeout=30) as c:
        yield c


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_malformed_request_is_4xx_with_error_body(http, path, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, **body} if "model" not in body else body).encode()
    error = _assert_error(http.post(path, content=body, headers={"content-type": "application/json"}), status, param)
    assert error["type"] == "invalid_request_error"


def test_context_length_exceeded_names_param_and_code(http):
    """OpenAI's shape for a prompt that does not fit: param names the prompt, code context_length_exceeded."""
    for path, body, param in [
        (COMP, {"prompt": [42] * 8192}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "hi " * 9000}]}, "messages"),
        (COMP, {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ]:
        error = _assert_error(http.post(path, json={"model": MODEL, **body}), 400, param)
        assert error["code"] == "context_length_exceeded"


def test_explicit_nulls_mean_the_defaults(http):
    """Clients (LangChain, LiteLLM) send null for fields they leave at the default; OpenAI accepts it."""
    nulls = {"n": None, "stream": None, "logprobs": None, "min_tokens": None, "ignore_eos": None}
    r = http.post(CHAT, json={"model": MODEL, "messages": MSGS, "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    r = http.post(COMP, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_tiny_temperature_and_top_p_answer(http):
    """temperature below 1e-5 is greedy (as vLLM); a top_p that is 0 in float32 still keeps the top token."""
    greedy = http.post(COMP, json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                   "temperature": 0}).json()["choices"][0]["text"]  # fmt: skip
    for extra in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-46}):
        r = http.post(COMP, json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_a_refused_prompt_counts_no_prompt_tokens(http):
    """A multi-prompt request refused for one of its prompts queues and counts none of them."""

    def prompt_tokens() -> float:
        text = http.get("/metrics").text
        return float(
            next(line.split()[-1] for line in text.splitlines() if line.startswith("kvserve:prompt_tokens_total"))
        )

    before = prompt_tokens()
    r = http.post(COMP, json={"model": MODEL, "prompt": [[1, 2, 3, 4, 5, 6, 7], [10**8]], "n": 3, "max_tokens": 2})
    _assert_error(r, 400)
    assert prompt_tokens() == before


def test_largest_seed_with_n_is_accepted(http):
    """seed 2**64 - 1 with n = 2: the second choice's seed wraps instead of failing the engine's step."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 1, "n": 2, "seed": 2**64 - 1}
    first, again = (http.post(COMP, json=body) for _ in range(2))
    assert first.status_code == 200, first.text
    assert [c["text"] for c in first.json()["choices"]] == [c["text"] for c in again.json()["choices"]]


def test_server_still_healthy_after_bad_input(http):
    assert http.get("/health").status_code == 200
    r = http.post(COMP, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_json_without_content_type_is_accepted(http):
    """`curl -d` sends application/x-www-form-urlencoded; the body is still read as JSON."""
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    r = http.post(COMP, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_tokenize_and_detokenize_refuse_bad_input(http):
    for path, body, param in (
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": "x", "messages": MSGS}, None),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
        ("/detokenize", {"tokens": [1, 10**8]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ):
        status = 404 if body.get("model") == "nope" else 400
        _assert_error(http.post(path, json=body), status, param)


def test_auth_required(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=server.base_url, timeout=10) as anon:
        error = _assert_error(anon.post(COMP, json=body), 401)
        assert error["code"] == "invalid_api_key"
        _assert_error(anon.post(COMP, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _assert_error(anon.get("/v1/models"), 401)
        _assert_error(anon.post(CHAT, content=b"{bad json"), 401)  # auth before parsing
        _assert_error(anon.post("/tokenize", json={"prompt": "x"}), 401)  # the tokenizer endpoints too
        _assert_error(anon.post("/detokenize", json={"tokens": [1]}), 401)
        assert anon.get("/health").status_code == 200  # probes and scrapers are not guarded
        assert anon.get("/metrics").status_code == 200
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_body_too_large(http):
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
    error = _assert_error(http.post(COMP, content=big), 413)
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * (64 << 10)

    _assert_error(http.post(COMP, content=chunks()), 413)


def test_unknown_route_and_method(http):
    assert _assert_error(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert _assert_error(http.get(COMP), 405)["code"] == "method_not_allowed"


def test_openai_client_sees_bad_request(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSGS, stream=True, tools=[{"type": "function"}])


def test_queue_full_is_429_with_retry_after(server_factory):
    """One seat, one waiting slot: a running request and a waiting one fill the server; a third gets 429."""
    srv = server_factory(max_num_seqs=1, max_waiting_requests=1)
    long = {"model": MODEL, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with srv.client(timeout=30) as c:
        with c.stream("POST", COMP, json=long) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is running now
            with c.stream("POST", COMP, json=long) as waiting:
                assert waiting.status_code == 200  # accepted; waits for the seat
                r = c.post(COMP, json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                error = _assert_error(r, 429)
                assert error["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    # Both streams were dropped: their requests are aborted (the waiting one too) and every block is free.
    srv.wait_idle()
    assert srv.engine.get_stats().num_used_blocks == 0
    with srv.client() as c:  # no --api-key on this server: /v1 is open
        assert c.post(COMP, json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200
