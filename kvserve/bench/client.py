"""The load client: one process, one asyncio loop, httpx streaming from any OpenAI-compatible server.

It shares the machine's cores with the server it measures, so the hot path does as little as it can: read SSE
lines, take a timestamp when a chunk carries text, json-decode it, and nothing else (no tokenizer). Output
tokens come from the server's final `usage` (stream_options.include_usage), else from the number of chunks that
carried text; prompt and cached tokens come from `usage` only (None when the server does not report them).

A request is sent when its turn comes (a worker of --concurrency frees up, or its Poisson / trace arrival
time passes) and, for requests that continue a conversation, when the request it depends on has finished.
Every request ends as a RequestResult, failed ones included: HTTP errors, an error event in the stream, a
stream cut before [DONE], or a stream with no choice at all are failures, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvserve.bench.workloads import BenchRequest


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str
    max_tokens: int = 128
    concurrency: int | None = None  # exactly one of concurrency / request_rate, or neither for trace replay
    request_rate: float | None = None  # requests per second, Poisson arrivals
    seed: int = 0  # seeds the arrival times
    temperature: float = 0.0
    ignore_eos: bool = False  # an extension (vLLM, llama.cpp, kvserve): every answer runs to max_tokens
    timeout_s: float = 600.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # when it was sent, seconds from the start of the run
    ttft: float | None = None  # seconds to the first chunk with text
    e2e: float | None = None  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between chunks with text
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchRun:
    results: list[RequestResult]
    duration_s: float
    client_cpu_s: float  # time.process_time() over the run: this client's own cost
    max_in_flight: int = 0  # the most requests outstanding at once (below --concurrency when dependencies wait)


def api_root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model id the server lists at /v1/models."""
    async with httpx.AsyncClient(timeout=timeout_s, headers=_headers(api_key)) as client:
        r = await client.get(api_root(base_url) + "/models")
        r.raise_for_status()
        try:
            body = r.json()
        except ValueError:
            body = None
    models = body.get("data") if isinstance(body, dict) else None
    first = models[0] if isinstance(models, list) and models else None
    if not isinstance(first, dict) or not isinstance(first.get("id"), str):
        raise ValueError(f"{api_root(base_url)}/models did not name a model (OpenAI's data[0].id); give --model")
    return first["id"]


def payload(req: BenchRequest, cfg: ClientConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.max_tokens or cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.is_chat:
        body["messages"] = list(req.messages or ())
        if req.tools is not None:
            body["tools"] = list(req.tools)
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def send(
    client: httpx.AsyncClient, root: str, req: BenchRequest, cfg: ClientConfig, index: int, t0: float
) -> RequestResult:
    """Send one streaming request and time it; never raises."""
    res = RequestResult(index=index)
    start = time.perf_counter()
    res.start = start - t0
    try:
        await asyncio.wait_for(_stream(client, root, req, cfg, res, start), cfg.timeout_s)
    except asyncio.TimeoutError:
        res.error = f"timeout: no complete answer within {cfg.timeout_s:g} s (--timeout)"
    return res


async def _stream(
    client: httpx.AsyncClient, root: str, req: BenchRequest, cfg: ClientConfig, res: RequestResult, start: float
) -> None:
    """send()'s body: fills in res (never raises but for the caller's timeout)."""
    url = root + ("/chat/completions" if req.is_chat else "/completions")
    chunks = 0
    last = None
    finished = done = False
    try:
        async with client.stream("POST", url, json=payload(req, cfg)) as r:
            if r.status_code != 200:
                body = (await r.aread())[:300].decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    res.error = f"error event: {str(event['error'])[:300]}"
                    return
                for choice in event.get("choices") or ():
                    if _text(choice, req.is_chat):
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                    finished = finished or choice.get("finish_reason") is not None
                usage = event.get("usage")
                if usage:
                    _read_usage(res, usage)
    except Exception as e:  # httpx errors (a cut stream, a read timeout), bad JSON: all count as failures
        res.error = f"{type(e).__name__}: {e}"[:300]
        return
    res.e2e = time.perf_counter() - start
    if not done:
        res.error = "stream ended before [DONE]"
    elif not finished and chunks == 0:
        res.error = "empty stream: no text and no finish_reason"
    else:
        res.ok = True
        res.output_tokens = res.output_tokens or chunks


def _text(choice: dict[str, Any], is_chat: bool) -> str:
    if not is_chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


def _read_usage(res: RequestResult, usage: dict[str, Any]) -> None:
    res.output_tokens = int(usage.get("completion_tokens") or 0)
    if usage.get("prompt_tokens") is not None:
        res.prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        res.cached_tokens = int(details["cached_tokens"])


def arrival_times(requests: list[BenchRequest], cfg: ClientConfig) -> list[float]:
    """Send times (seconds from the start) for rate or trace mode: Poisson gaps from cfg.seed, or the trace's."""
    if cfg.request_rate is not None:
        rng = random.Random(cfg.seed)
        t, out = 0.0, []
        for _ in requests:
            out.append(t)
            t += rng.expovariate(cfg.request_rate)
        return out
    return [r.arrival_time or 0.0 for r in requests]


async def run_requests(requests: list[BenchRequest], cfg: ClientConfig, progress: bool = False) -> BenchRun:
    """Send every request under cfg's schedule; one RequestResult per request, in request order."""
    from tqdm import tqdm

    if cfg.concurrency is not None and cfg.request_rate is not None:
        raise ValueError("give --concurrency or --request-rate, not both")
    n = len(requests)
    root = api_root(cfg.base_url)
    results: list[RequestResult | None] = [None] * n
    finished = [asyncio.Event() for _ in range(n)]
    bar = tqdm(total=n, disable=not progress, unit="req", dynamic_ncols=True)
    limits = httpx.Limits(max_connections=cfg.concurrency or n, max_keepalive_connections=cfg.concurrency or n)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits, headers=_headers(cfg.api_key)) as client:
        cpu0, t0 = time.process_time(), time.perf_counter()
        in_flight = [0, 0]  # now, most

        async def one(i: int) -> None:
            dep = requests[i].depends_on
            if dep is not None:
                await finished[dep].wait()
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            try:
                results[i] = await send(client, root, requests[i], cfg, i, t0)
            finally:
                in_flight[0] -= 1
            finished[i].set()
            bar.update(1)

        if cfg.concurrency is not None:
            todo = iter(range(n))

            async def worker() -> None:
                # Requests go out in index order, so a dependency was always taken by some worker already.
                for i in todo:
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, n))))
        else:

            async def at(i: int, when: float) -> None:
                await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
                await one(i)

            await asyncio.gather(*(at(i, w) for i, w in enumerate(arrival_times(requests, cfg))))
        duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    bar.close()
    done = [r for r in results if r is not None]
    return BenchRun(results=done, duration_s=duration, client_cpu_s=cpu, max_in_flight=in_flight[1])


async def warm_up(cfg: ClientConfig, num: int) -> None:
    """A few short unique prompts before the measured run (first-call costs stay out of the numbers)."""
    warm = [BenchRequest(prompt=f"Warm-up request {i}: name three colours.") for i in range(num)]
    await run_requests(warm, ClientConfig(**{**cfg.__dict__, "max_tokens": 4, "concurrency": 1, "request_rate": None}))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
