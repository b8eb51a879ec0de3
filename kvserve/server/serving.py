"""Running one OpenAI request through the AsyncEngine: as a JSON response or as server-sent events.

Whatever way a request ends (finished, client gone, error), its engine requests are aborted on the way out,
so their KV blocks go back to the pool at once:
  streaming      when the SSE response ends (Starlette cancels it when the client disconnects);
  non-streaming  a watcher on the ASGI receive channel, raced against the collection of outputs.
An engine error on one request becomes a 500 (or an error event mid-stream); other requests go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from kvserve.errors import InvalidRequestError as EngineInvalidRequest
from kvserve.outputs import RequestOutput
from kvserve.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from kvserve.server.errors import (
    APIError,
    ClientClosedRequest,
    EngineRequestError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
)
from kvserve.server.prompts import EngineInput
from kvserve.server.protocol import SamplingRequest
from kvserve.server.request_stream import RequestStream
from kvserve.server.responses import ChoiceTracker, Formatter

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start(
    engine: AsyncEngine, inp: EngineInput, body: SamplingRequest, request_id: str, params: dict[str, str]
) -> RequestStream:
    """Hand the request to the engine, mapping its refusals to HTTP errors. params: the API's names for the
    engine's (a chat request's prompt is its `messages`)."""
    try:
        return await engine.add(inp.prompts, inp.params, cache_salt=body.cache_salt, request_id=request_id)
    except EngineInvalidRequest as e:
        param = params.get(e.param, e.param) if e.param else None
        raise InvalidRequestError(str(e), param=param, code=e.code) from None
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    except QueueFullError as e:
        raise RateLimitError(str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
    except EngineDeadError as e:
        raise ServiceUnavailableError(str(e)) from None


class _SSEResponse(StreamingResponse):
    """Aborts the stream when the response ends, however it ends: finished, failed, or cancelled because the
    client disconnected (Starlette cancels the body, possibly before the generator even started)."""

    def __init__(self, stream: RequestStream, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abort()  # a no-op when every choice finished


def stream_response(
    stream: RequestStream, tracker: ChoiceTracker, fmt: Formatter, include_usage: bool
) -> StreamingResponse:
    return _SSEResponse(stream, _events(stream, tracker, fmt, include_usage))


async def _events(
    stream: RequestStream, tracker: ChoiceTracker, fmt: Formatter, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for chunk in fmt.start_chunks(tracker.num_choices):
            yield _sse(chunk)
        async for index, out in stream:
            _raise_if_failed(out)
            delta = tracker.update(index, out)
            if delta is not None:
                for chunk in fmt.chunks(delta):
                    yield _sse(chunk)
        if include_usage:
            yield _sse(fmt.usage_chunk(tracker.usage()))
    except (APIError, EngineDeadError) as e:
        error = e if isinstance(e, APIError) else ServiceUnavailableError(str(e))
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


async def collect(stream: RequestStream, tracker: ChoiceTracker, fmt: Formatter, request: Request) -> JSONResponse:
    """Wait for every choice to finish (or the client to leave) and answer with one JSON body."""
    gather = asyncio.ensure_future(_gather(stream, tracker))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({gather, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not gather.done():
            raise ClientClosedRequest(f"client left before request {stream.request_id} finished")
        gather.result()  # raises the request's error, if any
    except EngineDeadError as e:
        raise ServiceUnavailableError(str(e)) from None
    finally:
        for task in (gather, watcher):
            task.cancel()
        stream.abort()
    return JSONResponse(fmt.response(tracker).model_dump(mode="json"))


async def _gather(stream: RequestStream, tracker: ChoiceTracker) -> None:
    async for index, out in stream:
        _raise_if_failed(out)
        tracker.update(index, out)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so http.disconnect is all that comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _raise_if_failed(out: RequestOutput) -> None:
    if out.outputs[0].finish_reason == "error":
        log.warning("request %s failed in the engine: %s", out.request_id, out.error)
        raise EngineRequestError(f"the engine failed on this request: {out.error or 'unknown error'}")


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
