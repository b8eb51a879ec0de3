"""Server pieces without a model: request schemas, error bodies, stream deltas, CLI flags."""

from __future__ import annotations

import pytest

from kvserve.cli import build_parser
from kvserve.cli import main as cli_main
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import app as app_module
from kvserve.server.errors import InvalidRequestError
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from kvserve.server.responses import ChoiceTracker


def _bad(raw: bytes, cls=CompletionRequest) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(raw, cls)
    return info.value


def test_neutral_values_of_unsupported_fields_are_accepted():
    body = (
        b'{"messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],'
        b' "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"},'
        b' "tools": [], "tool_choice": "none", "logit_bias": {}, "store": false, "user": "u1"}'
    )
    req = parse_request(body, ChatCompletionRequest)
    assert req.messages[0].template_dict() == {"role": "system", "content": "hi"}
    assert req.user == "u1" and req.max_new_tokens is None


def test_unknown_top_level_fields_are_ignored_nested_ones_refused():
    """vLLM's rule: a router or client field kvserve does not know is dropped (logged once); inside a known
    object an unknown key is still a 400 naming it."""
    req = parse_request(b'{"prompt": "x", "no_stop_trim": false, "separate_reasoning": true}', CompletionRequest)
    assert req.prompt == "x" and "no_stop_trim" not in req.model_dump()
    e = _bad(b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": true, "bogus": 1}}')
    assert e.param == "stream_options.bogus"


def test_unsupported_values_name_their_field():
    e = _bad(b'{"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}',
             ChatCompletionRequest)  # fmt: skip
    assert e.param == "functions" and "not supported" in e.message and e.status_code == 400
    e = _bad(b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}',
             ChatCompletionRequest)  # fmt: skip
    assert e.param == "response_format.type" and e.status_code == 400
    assert _bad(b'{"prompt": "x", "best_of": 2}').param == "best_of"
    chat = b'{"messages": [{"role": "user", "content": "x"}], "echo": %s}'
    assert _bad(chat % b"true", ChatCompletionRequest).param == "echo"  # vLLM's chat echo: not implemented
    for neutral in (b"false", b"null"):
        assert parse_request(chat % neutral, ChatCompletionRequest).messages[0].content == "x"


def test_strict_types_and_messages():
    e = _bad(b'{"prompt": "x", "max_tokens": "5"}')
    assert e.param == "max_tokens" and "integer" in e.message
    assert _bad(b'{"prompt": "x", "ignore_eos": 1}').param == "ignore_eos"
    assert "not valid JSON" in _bad(b"{").message
    assert parse_request(b'{"prompt": "x", "zzz": 1}', CompletionRequest).prompt == "x"  # unknown: ignored
    assert _bad(b'{"prompt": "x", "stream_options": {"zzz": 1}}').param == "stream_options.zzz"  # nested: not
    assert _bad(b"{}").param == "prompt"
    ok = parse_request(b'{"prompt": [[1, 2], [3]], "stop": "\\n", "temperature": 1}', CompletionRequest)
    assert ok.stop_list == ("\n",) and ok.temperature == 1.0 and ok.max_tokens == 16


def _out(text: str, ids: list[int], finish: str | None, logprobs: list[float] | None = None) -> RequestOutput:
    c = CompletionOutput(0, text, ids, logprobs=logprobs, finish_reason=finish)
    return RequestOutput("r-0", None, [1, 2, 3], [c], finished=finish is not None, num_cached_tokens=16)


def test_tokens_without_text_ride_with_the_next_delta():
    """The engine's outputs are deltas; a step whose token made no text yet (held back, or half a UTF-8
    character) is not sent alone: its tokens and logprobs go with the next delta that has text."""
    tracker = ChoiceTracker(num_choices=1, n=1, keep_whole=True)
    steps = [("ab", [1], None, [-0.1]), ("", [2], None, [-0.2]), ("", [3], None, [-0.3]), ("c", [4], "stop", [-0.4])]
    sent = [tracker.update(0, _out(*step)) for step in steps]
    assert sent[1] is None and sent[2] is None
    assert (sent[0].text, sent[0].token_ids, sent[0].first) == ("ab", [1], True)
    assert (sent[3].text, sent[3].token_ids, sent[3].logprobs, sent[3].first) == (
        "c",
        [2, 3, 4],
        [-0.2, -0.3, -0.4],
        False,
    )
    whole = tracker.final(0)
    assert (whole.text, whole.token_ids, whole.logprobs) == ("abc", [1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])
    usage = tracker.usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (3, 4, 16)


def test_serve_flags_and_env_api_key(monkeypatch):
    args = build_parser().parse_args(
        ["serve", "m", "--api-key", "k", "--max-waiting-requests", "3", "--max-body-bytes", "2MiB",
         "--served-model-name", "svc", "--log-level", "debug"]
    )  # fmt: skip
    assert (args.host, args.port, args.api_key, args.max_waiting_requests) == ("127.0.0.1", 8000, "k", 3)
    assert args.max_body_bytes == 2 << 20 and args.served_model_name == "svc"
    seen: dict = {}
    monkeypatch.setattr(app_module, "build_app", lambda config, **kw: seen.update(kw, config=config) or "app")
    monkeypatch.setattr(app_module, "serve_forever", lambda app, **kw: seen.update(kw, app=app))
    monkeypatch.setenv("KVSERVE_API_KEY", "from-env")
    frozen = []
    monkeypatch.setattr(app_module, "freeze_startup_objects", lambda: frozen.append(("config" in seen, "app" in seen)))
    assert cli_main(["serve", "--num-kv-blocks", "64"]) == 0
    assert seen["api_key"] == "from-env" and seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["config"].num_kv_blocks == 64 and seen["app"] == "app"
    assert frozen == [(True, False)]  # start-up objects frozen once, after the app is built and before serving


def test_freeze_startup_objects_takes_them_out_of_collections():
    import gc

    keep = [[i] for i in range(1000)]  # tracked, alive
    try:
        assert app_module.freeze_startup_objects() >= len(keep)
        assert not any(gc.is_tracked(x) and x in gc.get_objects(generation=2) for x in keep[:3])
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
