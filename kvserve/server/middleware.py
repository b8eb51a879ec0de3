"""Two ASGI guards that answer before the app reads a request: API key (401) and body size (413).

They sit outside FastAPI's exception handling, so they send their OpenAI-style error bodies themselves.
The API key is checked first: an unauthenticated client cannot make the server read a large body.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.server.errors import APIError, AuthenticationError, RequestTooLargeError


async def _send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every path that starts with one of `prefixes` (the API and the
    tokenizer endpoints; /health, /metrics and /version stay open for probes and scrapers)."""

    def __init__(self, app: ASGIApp, api_key: str, prefixes: tuple[str, ...] = ("/v1/", "/tokenize", "/detokenize")):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes) and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                error = AuthenticationError(
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await _send_error(send, error)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Reads the whole body up to max_bytes (413 beyond), then replays it to the app.

    After the replay, receive() passes through, so the app still sees http.disconnect when the client leaves.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending the body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"the request body exceeds the limit of {self.max_bytes} bytes (--max-body-bytes)")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            message: dict[str, Any] = {"type": "http.request", "body": body, "more_body": False}
            return message
        return await receive()

    return replay
