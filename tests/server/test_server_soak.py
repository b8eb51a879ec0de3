"""Soak (bounded, loopback): 200 concurrent streaming requests of random lengths, a fifth dropped mid-stream.

Every stream that completes must be well formed (each chunk parses as the openai client's own type, one
finish reason, usage consistent, ends in [DONE]); afterwards no request runs and no KV block is held.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from .conftest import MODEL

NUM_REQUESTS = 200
WORDS = "the a cat dog runs fast slow red blue sky over under house tree river stone light".split()


@dataclass
class Outcome:
    cancelled: bool
    max_tokens: int
    chunks: list[dict]
    done: bool


async def one(client: httpx.AsyncClient, rng: random.Random, i: int) -> Outcome:
    chat = i % 2 == 0
    max_tokens = rng.randint(1, 24)
    cancel_after = rng.randint(1, 3) if i % 5 == 0 else None
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    body: dict = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": rng.choice([0, 0.8])}
    body["stream_options"] = {"include_usage": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    else:
        path, body["prompt"] = "/v1/completions", text
    chunks: list[dict] = []
    done = False
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            chunks.append(json.loads(data))
            if cancel_after is not None and len(chunks) >= cancel_after:
                return Outcome(True, max_tokens, chunks, False)  # leaving the block drops the connection
    return Outcome(False, max_tokens, chunks, done)


def _completion_chunk(chunk: dict) -> Completion:
    """openai's Completion type (the client's type for stream chunks too) insists on a finish reason, which
    chunks before the last lack: validate with a stand-in, then check the real value."""
    reasons = [c["finish_reason"] for c in chunk["choices"]]
    assert all(r in (None, "stop", "length") for r in reasons)
    stand_in = {**chunk, "choices": [{**c, "finish_reason": "length"} for c in chunk["choices"]]}
    parsed = Completion.model_validate(stand_in)
    for choice, reason in zip(parsed.choices, reasons):
        choice.finish_reason = reason
    return parsed


def check_complete(o: Outcome) -> None:
    assert o.done and o.chunks
    assert "error" not in o.chunks[-1]
    chat = o.chunks[0]["object"] == "chat.completion.chunk"
    parsed = [ChatCompletionChunk.model_validate(c) if chat else _completion_chunk(c) for c in o.chunks]
    assert len({p.id for p in parsed}) == 1
    *content, usage_chunk = parsed
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    finishes = [p.choices[0].finish_reason for p in content if p.choices[0].finish_reason]
    assert finishes == [content[-1].choices[0].finish_reason] and finishes[0] in ("stop", "length")
    assert all(p.choices[0].index == 0 for p in content)
    usage = usage_chunk.usage
    assert 1 <= usage.completion_tokens <= o.max_tokens
    assert finishes[0] == "stop" or usage.completion_tokens == o.max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_soak_concurrent_streams_with_cancellations(server):
    rng = random.Random(1234)

    async def run() -> list[Outcome]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=NUM_REQUESTS + 10)
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(one(c, rng, i) for i in range(NUM_REQUESTS)))

    t0 = time.monotonic()
    outcomes = asyncio.run(run())
    elapsed = time.monotonic() - t0
    completed = [o for o in outcomes if not o.cancelled]
    assert len(completed) >= NUM_REQUESTS * 4 // 5 - 1
    for o in completed:
        check_complete(o)
    server.wait_idle(timeout=10)
    m = server.metrics()
    assert m["kvserve:num_requests_running"] == 0 and m["kvserve:kv_cache_usage_perc"] == 0
    assert server.engine.get_stats().num_used_blocks == 0
    assert not server.engine.has_unfinished_requests()
    server.engine.check_invariants()
    print(f"soak: {NUM_REQUESTS} streams in {elapsed:.1f}s; aborts {m.get(ABORTS, 0):.0f}")


ABORTS = 'kvserve:request_success_total{finished_reason="abort"}'
