"""kvserve behind vLLM's own router (`vllm-router`, a Rust binary from the package index), as a user runs it.

The router re-serialises every request with vLLM's and SGLang's extra fields (no_stop_trim, separate_reasoning,
stream_reasoning, include_reasoning, return_hidden_states, ...); kvserve must answer through it, not 400.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import _free_port, require_component
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def routed(server_factory):
    """(kvserve server, router base URL): a round-robin vllm-router on loopback with one kvserve worker."""
    binary = Path(sys.executable).parent / "vllm-router"
    require_component(binary.exists(), "vllm-router", "make test installs the [test] extra's vllm-router")
    srv = server_factory()
    port = _free_port()
    args = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", srv.base_url]
    args += ["--policy", "round_robin", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]
    args += ["--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "60"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/liveness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vllm-router did not become live in 60 s")
            time.sleep(0.2)
        yield srv, base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _direct_and_routed(routed, path: str, body: dict) -> tuple[dict, dict]:
    srv, base = routed
    direct = httpx.post(f"{srv.base_url}{path}", json=body, timeout=60)
    through = httpx.post(f"{base}{path}", json=body, timeout=60)
    assert direct.status_code == 200, direct.text
    assert through.status_code == 200, through.text
    return direct.json(), through.json()


def test_chat_through_router_matches_direct(routed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12}
    direct, through = _direct_and_routed(routed, "/v1/chat/completions", {**body, "temperature": 0})
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert through["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] > 0


def test_completion_through_router_matches_direct(routed):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    direct, through = _direct_and_routed(routed, "/v1/completions", body)
    assert through["choices"][0]["text"] == direct["choices"][0]["text"]


def test_tool_call_through_router(routed):
    zone = {"type": "string", "enum": ["UTC", "CET"]}
    params = {"type": "object", "properties": {"zone": zone}, "required": ["zone"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "get_time", "parameters": params}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What time is it?"}], "max_tokens": 40}
    _, through = _direct_and_routed(
        routed,
        "/v1/chat/completions",
        {**body, "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
    )
    choice = through["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]][:1] == ["get_time"]


def test_stream_through_router(routed):
    srv, base = routed
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 10}
    body |= {"temperature": 0, "stream": True}
    text, done = "", False
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    direct = httpx.post(f"{srv.base_url}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert done and text == direct["choices"][0]["message"]["content"]
    srv.wait_idle()
