"""RequestStream: what an HTTP handler reads, the outputs of one API request as the engine thread delivers them.

One API request is num_prompts * n engine requests ("children", ids f"{request_id}-{index}"); the stream
yields (index, RequestOutput) for each, in the order the engine produced them, and ends when every child
has finished, or with the error that ended it (EngineDeadError, RequestAbortedError).
Everything here runs on the event loop; the engine thread reaches it only through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from kvserve.outputs import RequestOutput


class RequestAbortedError(Exception):
    """The request was aborted while someone still read its stream."""


class RequestStream:
    """The outputs of one API request: (index, RequestOutput) for each of its children, as they come."""

    def __init__(self, request_id: str, num_children: int, abort: Callable[[RequestStream], None]):
        self.request_id = request_id
        self.num_children = num_children
        self.arrival_time = time.monotonic()
        self._abort = abort
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._open = set(range(num_children))
        self._abort_sent = False

    def child_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    @property
    def finished(self) -> bool:
        return not self._open

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._open.clear()
                raise item
            index, out = item
            if out.finished:
                self._open.discard(index)
            yield index, out

    def abort(self) -> None:
        """Abort the children still running (idempotent, never raises; call on the event loop)."""
        if self._open and not self._abort_sent:
            self._abort_sent = True
            self._abort(self)

    def put(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        """Deliver an output (or the error that ends the stream); on the event loop only."""
        self._queue.put_nowait(item)
