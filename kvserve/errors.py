"""The engine's typed errors: what a caller did wrong, said once, in terms an API layer can map.

    InvalidRequestError (a ValueError)     the request cannot be served as asked     -> HTTP 400
      ContextLengthError                   prompt (+ max_tokens) beyond the context  -> 400 context_length_exceeded

`param` names the offending input in the engine's terms ("prompt", "max_tokens", "logprobs", ...); the server
renames it where its API spells it differently (a chat request's prompt is its `messages`).
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses; nothing of it was queued."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt leaves no room for a generated token, or the request cannot fit the KV pool."""

    code = "context_length_exceeded"
