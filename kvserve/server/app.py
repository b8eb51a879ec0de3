"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngine, and `kvserve serve`.

  POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events ending in data: [DONE])
  GET  /v1/models, /health, /metrics, /version
Binds 127.0.0.1 unless told otherwise; --api-key (or KVSERVE_API_KEY) guards /v1/*.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from kvserve import __version__
from kvserve.config import EngineConfig
from kvserve.model.loader import LoadedModel
from kvserve.server import serving
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.engine_client import EngineClient
from kvserve.server.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    install_error_handlers,
)
from kvserve.server.metrics import ServerMetrics
from kvserve.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from kvserve.server.prompts import EngineInput, Limits, chat_input, chat_text, completion_input, echo_texts
from kvserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
    parse_request,
)
from kvserve.server.protocol_out import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from kvserve.server.responses import ChatFormatter, ChoiceTracker, CompletionFormatter, Formatter

log = logging.getLogger(__name__)

DEFAULT_MAX_WAITING_REQUESTS = 512
DEFAULT_MAX_BODY_BYTES = 1 << 20


def build_app(
    engine_config: EngineConfig,
    *,
    api_key: str | None = None,
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    served_model_name: str | None = None,
    loaded: LoadedModel | None = None,
) -> FastAPI:
    """Load the engine now; its step thread starts with the app (lifespan) and stops with it.

    app.state.async_engine is the AsyncEngine (its .engine the LLMEngine), app.state.metrics the metrics.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    metrics = ServerMetrics()
    async_engine = AsyncEngine.from_config(
        engine_config, loaded=loaded, max_waiting_requests=max_waiting_requests, metrics=metrics
    )
    return make_app(
        async_engine,
        served_model_name or engine_config.model,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
    )


def make_app(
    client: EngineClient,
    model_name: str,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The HTTP API over an engine client: one AsyncEngine (build_app), or a fleet of replicas behind Ray
    Serve (kvserve/fleet/ingress.py); the client starts and stops with the app."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    routes = _Routes(client, model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client.start()
        yield
        client.shutdown()

    app = FastAPI(title="kvserve", version=__version__, lifespan=lifespan)
    app.state.async_engine = client
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last = runs first
    post, get = ["POST"], ["GET"]
    app.add_api_route("/v1/completions", routes.completions, methods=post, openapi_extra=_json_body(CompletionRequest))
    app.add_api_route(
        "/v1/chat/completions", routes.chat, methods=post, openapi_extra=_json_body(ChatCompletionRequest)
    )
    app.add_api_route("/tokenize", routes.tokenize, methods=post, openapi_extra=_json_body(TokenizeRequest))
    app.add_api_route("/detokenize", routes.detokenize, methods=post, openapi_extra=_json_body(DetokenizeRequest))
    app.add_api_route("/v1/models", routes.models, methods=get)
    app.add_api_route("/health", routes.health, methods=get)
    app.add_api_route("/metrics", routes.metrics, methods=get)
    app.add_api_route("/version", lambda: {"version": __version__}, methods=get)
    return app


class _Routes:
    """The handlers, and what they share: the engine, the names it answers to, a request's limits."""

    def __init__(self, client: EngineClient, model_name: str):
        limits = client.limits()
        self.async_engine = client
        self.model_name = model_name
        self.accepted_names = {model_name, *client.model_names}
        self.limits = Limits(limits.max_model_len, limits.kv_capacity_tokens)
        self.tokenizer = client.get_tokenizer()
        self.vocab_size = limits.vocab_size

    async def completions(self, request: Request) -> Response:
        body = parse_request(await request.body(), CompletionRequest)
        self._check_model(body.model)
        inp = completion_input(body, self.tokenizer, self.limits)
        echo = echo_texts(body, inp.prompts) if body.echo else None
        fmt = CompletionFormatter(uuid.uuid4().hex, self.model_name, self.tokenizer, echo, body.n)
        return await self._run(body, inp, fmt, request, _structured_param(body))

    async def chat(self, request: Request) -> Response:
        body = parse_request(await request.body(), ChatCompletionRequest)
        self._check_model(body.model)
        inp = chat_input(body, self.tokenizer, self.limits)
        tool_choice = body.effective_tool_choice
        fmt = ChatFormatter(uuid.uuid4().hex, self.model_name, self.tokenizer, parse_tools=tool_choice != "none")
        max_tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        names = {"prompt": "messages", "max_tokens": max_tokens, **_structured_param(body)}
        if tool_choice not in ("none", "auto"):  # the constraint is the tools' schemas
            names["structured_outputs"] = "tools"
        return await self._run(body, inp, fmt, request, names)

    async def tokenize(self, request: Request) -> TokenizeResponse:
        """vLLM's /tokenize: the ids a prompt (or a conversation, through the chat template) becomes."""
        body = parse_request(await request.body(), TokenizeRequest)
        self._check_model(body.model)
        if body.messages is not None:
            text = chat_text(body.messages, self.tokenizer, body.add_generation_prompt, tools=body.tools)
            ids = self.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        else:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=special)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.limits.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: Request) -> DetokenizeResponse:
        """vLLM's /detokenize: the text of token ids (special tokens kept, as vLLM does)."""
        body = parse_request(await request.body(), DetokenizeRequest)
        self._check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param="tokens"
            )
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens, skip_special_tokens=False))

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.limits.max_model_len)])

    async def health(self) -> JSONResponse:
        healthy, reason, details = await self.async_engine.health()
        if not healthy:
            raise ServiceUnavailableError(f"the engine is not running: {reason or 'not started'}")
        return JSONResponse({"status": "ok", **details})

    async def metrics(self) -> Response:
        return Response(await self.async_engine.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in self.accepted_names:
            raise ModelNotFoundError(
                f"the model `{name}` does not exist; this server serves `{self.model_name}`", param="model"
            )

    async def _run(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        inp: EngineInput,
        fmt: Formatter,
        request: Request,
        params: dict[str, str],
    ) -> Response:
        stream = await serving.start(self.async_engine, inp, body, fmt.request_id, params)
        tracker = ChoiceTracker(stream.num_children, body.n, keep_whole=not body.stream)
        if body.stream:
            return serving.stream_response(stream, tracker, fmt, body.include_usage)
        return await serving.collect(stream, tracker, fmt, request)


@dataclass(frozen=True)
class ServerOptions:
    """`kvserve serve`'s flags beyond the engine's."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    served_model_name: str | None = None
    log_level: str = "info"
    threads: int | None = None  # CPU threads for the engine (a fleet splits them between its replicas)


def run_server(engine_config: EngineConfig, options: ServerOptions) -> None:
    """`kvserve serve`: build the app and run uvicorn until interrupted."""
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = options.api_key or os.environ.get("KVSERVE_API_KEY") or None
    if not api_key and not _is_loopback(options.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", options.host)
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    app = build_app(
        engine_config,
        api_key=api_key,
        max_waiting_requests=options.max_waiting_requests,
        max_body_bytes=options.max_body_bytes,
        served_model_name=options.served_model_name,
    )
    freeze_startup_objects()
    serve_forever(app, host=options.host, port=options.port, log_level=options.log_level)


def freeze_startup_objects() -> int:
    """Move everything alive after start-up (model, tokenizer, vocabularies: ~180k tracked objects for the
    bundled model) out of the cyclic GC's reach, as vLLM does after its engine starts. Otherwise every full
    collection walks all of them while the engine waits: 56 ms per gen-2 collection measured on this machine,
    a stall in whatever requests are running. They live as long as the server anyway. Returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve_forever(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    """uvicorn until SIGINT/SIGTERM, which also stops the engine at its next step: requests in flight end at
    once with a 503 error (an error event in a stream) instead of being cut off when the grace period ends."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.async_engine.stop_soon()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    _Server(config).run()


def _structured_param(body: SamplingRequest) -> dict[str, str]:
    """The engine names a constraint that does not compile structured_outputs; the request may have said
    response_format."""
    rf = body.response_format
    return {"structured_outputs": "response_format"} if rf is not None and rf.type != "text" else {}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI docs for a body the route parses itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
