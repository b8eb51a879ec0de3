"""EngineClient: everything the HTTP routes need from an engine, so one FastAPI app serves either one engine
(AsyncEngine, in process) or a fleet of engine replicas behind Ray Serve (kvserve/fleet/ingress.py).

add() queues one API request (prompts x n engine requests) and returns its RequestStream; it raises ValueError
or kvserve.errors.InvalidRequestError (HTTP 400), QueueFullError (429) or EngineDeadError (503), as
kvserve/server/serving.py maps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvserve.engine import EngineLimits
from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams
from kvserve.server.request_stream import RequestStream


class EngineClient(Protocol):
    @property
    def model_names(self) -> tuple[str, ...]: ...

    def limits(self) -> EngineLimits: ...

    def get_tokenizer(self) -> Tokenizer: ...

    def start(self) -> None:
        """Called on the event loop that will read the streams, when the app starts."""

    def shutdown(self) -> None: ...

    def stop_soon(self) -> None:
        """Stop after the current step (safe in a signal handler)."""

    async def add(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream: ...

    async def health(self) -> tuple[bool, str | None, dict[str, Any]]:
        """(healthy, why not, details for the /health body)."""
        ...

    async def render_metrics(self) -> bytes:
        """The Prometheus exposition of /metrics."""
        ...
