"""HTTP errors in OpenAI's shape: every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}.

Handlers code raises an APIError subclass; install_error_handlers() also maps what FastAPI/Starlette raise on
their own (validation and JSON errors -> 400 rather than FastAPI's 422, unknown routes -> 404) and turns any
unexpected exception into a JSON 500, so a client never sees an HTML page or a bare text body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineRequestError(APIError):
    """The engine failed on this request alone (finish_reason "error"); the server goes on serving."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class ClientClosedRequest(APIError):
    """The client left before its (non-streaming) answer was ready; nobody reads this response."""

    status_code = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class ServiceUnavailableError(APIError):
    """The engine loop is dead (or shutting down): nothing can be served until a restart."""

    status_code = 503
    type = "server_error"
    code = "engine_unavailable"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors: the first error, located by its dotted field path."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    ctx = first.get("ctx") or {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop union-member tags pydantic inserts ("prompt.str", "content.list[TextPart]") so param names a field.
    loc = [p for p in loc if not (p[:1].isalpha() and ("[" in p or p in {"str", "int", "list", "float", "bool"}))]
    if ctx.get("field"):  # a model validator's error about one of its fields
        loc.append(str(ctx["field"]))
    param = ctx.get("param") or (".".join(loc) or None)
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    where = f"{param}: " if param and not ctx.get("param") else ""
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return InvalidRequestError(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = error_body(str(exc.detail), type_, None, _HTTP_CODES.get(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        body = error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal_error")
        return JSONResponse(body, status_code=500)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
