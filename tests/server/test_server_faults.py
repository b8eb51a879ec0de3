"""Failures: a request that makes the model raise fails alone; a dead engine loop turns /health unhealthy;
a client that leaves (streaming or not) has its request aborted and its blocks freed at once."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import MODEL

COMP = "/v1/completions"
POISON = 31337  # a token id that makes the patched runner raise


@pytest.fixture(scope="module")
def faulty(server_factory):
    """A server whose runner raises for any batch holding a request whose prompt contains POISON."""
    srv = server_factory()
    runner = srv.engine._runner
    execute = runner.execute

    def poisoned(batch):
        if any(POISON in s.token_ids for s in batch.seqs):  # the prompt's chunk
            raise RuntimeError("injected fault")
        return execute(batch)

    runner.execute = poisoned
    return srv


def test_failing_request_fails_alone(faulty):
    good = {"model": MODEL, "prompt": "The sun is", "max_tokens": 12, "ignore_eos": True}
    bad = {"model": MODEL, "prompt": [1, 2, POISON, 3], "max_tokens": 12}

    async def run():
        async with httpx.AsyncClient(base_url=faulty.base_url, timeout=60) as c:
            return await asyncio.gather(c.post(COMP, json=good), c.post(COMP, json=bad), c.post(COMP, json=good))

    ok1, failed, ok2 = asyncio.run(run())
    assert ok1.status_code == ok2.status_code == 200
    assert ok1.json()["usage"]["completion_tokens"] == 12
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and "injected fault" in error["message"]
    with httpx.Client(base_url=faulty.base_url, timeout=10) as c:
        assert c.get("/health").status_code == 200
    faulty.wait_idle()
    assert faulty.engine.get_stats().num_used_blocks == 0
    faulty.engine.check_invariants()
    assert faulty.metrics()['kvserve:request_success_total{finished_reason="error"}'] >= 1


def test_failing_request_in_a_stream_gets_an_error_event(faulty):
    client = openai.OpenAI(base_url=f"{faulty.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in client.completions.create(model=MODEL, prompt=[5, POISON], max_tokens=4, stream=True):
            pass
    with httpx.Client(base_url=faulty.base_url, timeout=30) as c:
        lines = [x for x in c.post(COMP, json={"prompt": [POISON], "stream": True}).text.splitlines() if x]
        assert lines[-1] == "data: [DONE]" and '"engine_error"' in lines[-2]
        assert c.post(COMP, json={"prompt": "Fine", "max_tokens": 3}).status_code == 200


def test_client_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    before = server.metrics().get('kvserve:request_success_total{finished_reason="abort"}', 0)
    with server.client() as c:
        with c.stream("POST", COMP, json=body) as r:
            events = (line for line in r.iter_lines() if line.startswith("data:"))
            for _ in range(3):
                next(events)
            assert server.engine.get_stats().num_used_blocks > 0
    server.wait_idle(timeout=30)  # a deadline so a leak cannot hang the run, not a speed check
    assert server.engine.get_stats().num_used_blocks == 0
    assert server.metrics()['kvserve:request_success_total{finished_reason="abort"}'] == before + 1


def test_client_disconnect_while_waiting_non_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True}
    with server.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(COMP, json=body)  # gives up after 0.5 s and closes the connection
    server.wait_idle(timeout=5)
    assert server.engine.get_stats().num_used_blocks == 0


def test_dead_engine_loop_is_unhealthy_and_fails_requests(server_factory):
    srv = server_factory()
    long = {"model": MODEL, "prompt": "Count:", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with srv.client(timeout=30) as c:
        with c.stream("POST", COMP, json=long) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))

            def broken():
                raise RuntimeError("scheduler corrupted")

            srv.engine._scheduler.schedule = broken  # escapes step(): the loop cannot go on
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"engine_unavailable"' in rest[-2]
        health = c.get("/health")
        assert health.status_code == 503 and "scheduler corrupted" in health.json()["error"]["message"]
        r = c.post(COMP, json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert c.get("/metrics").status_code == 200
    srv.stop()
