"""A tiny fake OpenAI streaming server with known delays and token counts, for testing the bench client.

Server-wide behaviour is a mutable FakeSettings the test changes between runs (the server runs in a thread of
the test process). Per-request behaviour is a directive in the prompt or last message:

    [fail:500]    HTTP 500 before any byte of the stream
    [fail:event]  two chunks, then an error event and [DONE] (as kvserve and llama-server report engine errors)
    [fail:break]  two chunks, then the connection is cut (an exception inside the stream)
    [fail:nodone] two chunks, then the stream ends cleanly but without [DONE]

Every request streams max_tokens tokens, one chunk per `tokens_per_chunk` tokens, after `ttft_s`, one chunk
every `itl_s`; usage reports prompt_tokens = characters // 4 and cached_tokens = prompt_tokens * cached_fraction
(rounded down), and every reported usage is recorded in `log` so tests can compare.

/metrics is a 404 unless `serve_metrics`; then it is kvserve's own exposition (kvserve.server.metrics), as
if from earlier traffic (PRIOR_* below, so a client must take differences) plus one observation per completed
request: recomputed prompt tokens = prompt_tokens - cached_tokens, and with `checkpoint_metrics` each request
stores one checkpoint, hits one when it had cached tokens (resuming all of them) and changes the placement
(policy PLACEMENT_POLICY at PLACEMENT_DEPTHS) once. `metrics_text` replaces the whole body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from kvserve.server.metrics import ServerMetrics
from kvserve.stats import CheckpointCounters, EngineStats, PlacementInfo

MODEL = "fake-model"
PRIOR_REQUESTS, PRIOR_RECOMPUTED = 10, 100_000  # observations already on /metrics when a test starts
PRIOR_CHECKPOINTS = {"stored": 50, "hits": 40, "misses": 5, "evicted": 3, "bytes": 7 << 20, "resumed_tokens": 9999}
PRIOR_PLACEMENT_CHANGES = 7
PLACEMENT_POLICY, PLACEMENT_DEPTHS, BLOCK_SIZE = "optimal:4", (3, 17), 16


@dataclass
class FakeSettings:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    tokens_per_chunk: int = 1
    report_usage: bool = True
    report_cached: bool = True
    cached_fraction: float = 0.5
    serve_metrics: bool = False
    checkpoint_metrics: bool = True
    metrics_text: str | None = None
    models_body: object = None  # replaces /v1/models' JSON body when set


@dataclass
class Served:
    """What the server did for one request."""

    text: str
    start: float
    end: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


@dataclass
class FakeState:
    settings: FakeSettings = field(default_factory=FakeSettings)
    log: list[Served] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    checkpoints: dict[str, int] = field(default_factory=dict)
    placement_changes: int = 0

    def reset(self, **settings) -> None:
        self.settings = FakeSettings(**settings)
        self.log.clear()
        self.in_flight = self.max_in_flight = 0
        self.metrics = ServerMetrics()
        for _ in range(PRIOR_REQUESTS):
            self.metrics.observe_finished("length", 1.0, PRIOR_RECOMPUTED)
        self.checkpoints = dict(PRIOR_CHECKPOINTS)
        self.placement_changes = PRIOR_PLACEMENT_CHANGES

    def record(self, served: Served) -> None:
        """A request completed: what kvserve's engine would count for it."""
        cached = served.cached_tokens or 0
        self.metrics.observe_finished("length", served.end - served.start, served.prompt_tokens - cached)
        self.checkpoints["stored"] += 1
        self.checkpoints["bytes"] += 1024
        if cached:
            self.checkpoints["hits"] += 1
            self.checkpoints["resumed_tokens"] += cached
        self.placement_changes += 1

    def render_metrics(self) -> bytes:
        snapshot = EngineStats()
        if self.settings.checkpoint_metrics:
            placement = PlacementInfo(PLACEMENT_POLICY, PLACEMENT_DEPTHS, BLOCK_SIZE, self.placement_changes)
            snapshot = EngineStats(checkpoints=CheckpointCounters(**self.checkpoints), placement=placement)
        self.metrics.set_snapshot(snapshot)
        return self.metrics.render()


def build_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        if state.settings.models_body is not None:
            return JSONResponse(state.settings.models_body)
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        if state.settings.metrics_text is not None:
            return PlainTextResponse(state.settings.metrics_text)
        if not state.settings.serve_metrics:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(state.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        return _respond(state, body, body["prompt"], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        return _respond(state, body, "".join(m["content"] for m in body["messages"]), chat=True)

    return app


def _respond(state: FakeState, body: dict, text: str, chat: bool):
    if "[fail:500]" in text:
        return JSONResponse({"error": {"message": "injected failure", "type": "server_error"}}, status_code=500)
    return StreamingResponse(_stream(state, body, text, chat), media_type="text/event-stream")


async def _stream(state: FakeState, body: dict, text: str, chat: bool):
    s = state.settings
    served = Served(text=text, start=time.perf_counter())
    state.log.append(served)
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        n = body.get("max_tokens") or 16
        await asyncio.sleep(s.ttft_s)
        sent = 0
        while sent < n:
            k = min(s.tokens_per_chunk, n - sent)
            if sent > 0:
                await asyncio.sleep(s.itl_s)
            piece = "tok " * k
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = "length" if sent + k == n else None
            yield _sse({"object": "chunk", "choices": [choice]})
            sent += k
            if sent >= 2 and "[fail:" in text:
                if "[fail:event]" in text:
                    yield _sse({"error": {"message": "engine failed", "type": "server_error", "code": 500}})
                    yield "data: [DONE]\n\n"
                    return
                if "[fail:break]" in text:
                    raise RuntimeError("connection cut on purpose")
                if "[fail:nodone]" in text:
                    return
        served.prompt_tokens, served.completion_tokens = len(text) // 4, n
        if s.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": served.prompt_tokens,
                "completion_tokens": n,
                "total_tokens": served.prompt_tokens + n,
            }
            if s.report_cached:
                served.cached_tokens = int(served.prompt_tokens * s.cached_fraction)
                usage["prompt_tokens_details"] = {"cached_tokens": served.cached_tokens}
            yield _sse({"object": "chunk", "choices": [], "usage": usage})
        served.end = time.perf_counter()
        state.record(served)
        yield "data: [DONE]\n\n"
    finally:
        served.end = time.perf_counter()
        state.in_flight -= 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class FakeServer:
    """The fake app under uvicorn in a daemon thread, on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.state = FakeState()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.state), log_level="critical", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
