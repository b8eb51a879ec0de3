"""AsyncEngine: the synchronous LLMEngine driven by one background thread, fed and drained from asyncio.

  event loop (HTTP handlers)                          engine thread (the only caller of LLMEngine)
  add() / RequestStream.abort() ──► commands (queue.Queue) ──► applied between steps
  RequestStream (asyncio.Queue)  ◄── loop.call_soon_threadsafe ◄── the outputs of each step, in one batch

Torch releases the GIL inside its kernels, so the event loop keeps accepting and streaming while a step runs.
An abort is applied before the next step is scheduled, so a dropped client's KV blocks are freed at once.
One API request is one RequestStream (see request_stream.py) of num_prompts * n engine requests.
If the thread dies, is_healthy turns False and every pending and later request fails with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvserve.config import EngineConfig
from kvserve.engine import EngineLimits, LLMEngine, NewRequest
from kvserve.model.loader import LoadedModel
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.metrics import ServerMetrics
from kvserve.server.request_stream import RequestAbortedError, RequestStream

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is at --max-waiting-requests; the client should retry later (HTTP 429)."""

    def __init__(self, num_waiting: int, limit: int):
        super().__init__(f"the server is busy: {num_waiting} requests are waiting (limit {limit}); retry later")
        self.retry_after_s = 1


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (crash or shutdown); no request can be served (HTTP 503)."""


@dataclass
class _Child:
    stream: RequestStream
    index: int
    num_tokens: int = 0
    last_token_time: float | None = None


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[list[int]]
    params: SamplingParams
    cache_salt: str | None
    future: concurrent.futures.Future[None]


@dataclass
class _Abort:
    stream: RequestStream


class _Stop:
    pass


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_waiting_requests: int = 512,
        metrics: ServerMetrics | None = None,
        kv_event_sink: Callable[[Any], None] | None = None,
    ):
        """kv_event_sink: called on the engine thread with each batch of the prefix cache's KV events
        (LLMEngine.drain_kv_events; an engine replica hands them to the fleet's router)."""
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.engine = engine
        self._kv_event_sink = kv_event_sink
        if kv_event_sink is not None:  # record from the first request on (the first batch says `reset`)
            kv_event_sink(engine.drain_kv_events())
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self._commands: queue.Queue[_Add | _Abort | _Stop] = queue.Queue()
        self._children: dict[str, _Child] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "submit a command" against "the thread died"
        self._dead: str | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._drained_at = 0.0
        # Wall time up to which submitted requests are reflected in metrics.snapshot (a fleet router drops
        # its own count of what it sent a replica once the replica's report covers it)
        self.snapshot_covers = 0.0

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        *,
        loaded: LoadedModel | None = None,
        max_waiting_requests: int = 512,
        metrics: ServerMetrics | None = None,
        kv_event_sink: Callable[[Any], None] | None = None,
    ) -> AsyncEngine:
        """Load the model and build its engine (the step thread starts with start())."""
        if max_waiting_requests < 1:  # before the model loads
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        engine = LLMEngine(config, loaded=loaded)
        return cls(engine, max_waiting_requests=max_waiting_requests, metrics=metrics, kv_event_sink=kv_event_sink)

    # ------------------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        assert self._thread is None, "AsyncEngine.start() called twice"
        self._loop = asyncio.get_running_loop()
        self.metrics.set_snapshot(self.engine.get_stats())  # a fresh server's gauges and placement
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after aborting everything still running (their streams get EngineDeadError)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)

    def stop_soon(self) -> None:
        """Ask the thread to stop after its current step (safe in a signal handler: one attribute write)."""
        self._stopping = True

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    # EngineClient (kvserve/server/engine_client.py): what the HTTP routes read
    @property
    def model_names(self) -> tuple[str, ...]:
        return self.engine.model_names

    def limits(self) -> EngineLimits:
        return self.engine.limits()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.get_tokenizer()

    async def health(self) -> tuple[bool, str | None, dict[str, Any]]:
        return self.is_healthy, self.dead_reason, {}

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def add(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue len(prompts) * params.n engine requests as one stream, all or none.

        Returns once the engine accepted them. Raises ValueError (bad input), QueueFullError, EngineDeadError.
        Child index i * n + k is prompt i's k-th sample, as OpenAI numbers choices.
        """
        stream = RequestStream(request_id or uuid.uuid4().hex, len(prompts) * params.n, self._abort)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Add(stream, [list(p) for p in prompts], params, cache_salt, future))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            stream.abort()  # queued after the add, so it finds the children if the add went through
            raise
        return stream

    def _abort(self, stream: RequestStream) -> None:
        try:
            self._submit(_Abort(stream))
        except EngineDeadError:
            pass  # nothing runs any more

    def _submit(self, command: _Add | _Abort | _Stop) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine is not running: {self._dead}")
            self._commands.put(command)

    # --------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping and self._apply_commands(block=not engine.has_unfinished_requests()):
                if engine.has_unfinished_requests():
                    self._dispatch(engine.step())
                self.metrics.set_snapshot(engine.get_stats())
                self.snapshot_covers = self._drained_at
                if self._kv_event_sink is not None and (batch := engine.drain_kv_events()) is not None:
                    self._kv_event_sink(batch)
        except BaseException as exc:  # noqa: BLE001 - any escape leaves the engine in an unknown state
            log.exception("the engine loop died; failing every request")
            self._close(f"{type(exc).__name__}: {exc}", abort=False)
            return
        self._close("the server is shutting down", abort=True)
        try:
            engine.shutdown()  # finish writes to the persistent KV store, so a restart finds them
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.exception("engine shutdown failed")

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle). False once a stop was asked for."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            self._drained_at = time.time()
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort_now(command.stream)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._drained_at = time.time()  # everything submitted before now is applied
                return True

    def _add(self, cmd: _Add) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return  # the handler went away before we got here
        engine, stream = self.engine, cmd.stream
        if stream.num_children > self.max_waiting_requests:
            cmd.future.set_exception(
                ValueError(
                    f"the request asks for {stream.num_children} sequences (prompts x n), more than the server "
                    f"ever queues ({self.max_waiting_requests}, --max-waiting-requests)"
                )
            )
            return
        num_waiting = engine.num_waiting_requests()
        if num_waiting + stream.num_children > self.max_waiting_requests:
            cmd.future.set_exception(QueueFullError(num_waiting, self.max_waiting_requests))
            return
        n = cmd.params.n
        new = [
            NewRequest(
                cmd.prompts[index // n],
                cmd.params if n == 1 else cmd.params.child(index % n),
                stream.child_id(index),
                cmd.cache_salt,
            )
            for index in range(stream.num_children)
        ]
        try:
            engine.add_requests(new)  # validated once, all or none: a refused prompt leaves nothing queued
        except Exception as exc:  # noqa: BLE001 - InvalidRequestError is the client's; anything else is a 500
            cmd.future.set_exception(exc)
            return
        for index in range(stream.num_children):
            self._children[stream.child_id(index)] = _Child(stream, index)
        cmd.future.set_result(None)

    def _abort_now(self, stream: RequestStream) -> None:
        now = time.monotonic()
        aborted = False
        for index in range(stream.num_children):
            child = self._children.pop(stream.child_id(index), None)
            if child is not None and self.engine.abort(stream.child_id(index)):
                self.metrics.observe_finished("abort", now - stream.arrival_time)
                aborted = True
        if aborted:
            self._deliver([(stream, RequestAbortedError(f"request {stream.request_id} was aborted"))])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestStream, tuple[int, RequestOutput] | BaseException]] = []
        for out in outputs:
            child = self._children.get(out.request_id)
            if child is None:
                continue
            self._observe(child, out, now)
            if out.finished:
                del self._children[out.request_id]
            batch.append((child.stream, (child.index, out)))
        if batch:
            self._deliver(batch)

    def _observe(self, child: _Child, out: RequestOutput, now: float) -> None:
        completion = out.outputs[0]
        num_new = len(completion.token_ids)  # a delta: this step's tokens
        if num_new:
            if child.last_token_time is None:
                self.metrics.observe_first_token(now - child.stream.arrival_time)
            else:
                self.metrics.observe_next_tokens(num_new, now - child.last_token_time)
            child.num_tokens += num_new
            child.last_token_time = now
        if out.finished:
            recomputed = out.num_prompt_tokens_computed
            reason = completion.finish_reason or "error"
            self.metrics.observe_finished(reason, now - child.stream.arrival_time, recomputed)

    def _deliver(self, batch: list[tuple[RequestStream, tuple[int, RequestOutput] | BaseException]]) -> None:
        def put_all() -> None:
            for stream, item in batch:
                stream.put(item)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            log.warning("event loop closed; dropped %d outputs", len(batch))

    def _close(self, reason: str, abort: bool) -> None:
        """Refuse new commands, fail queued adds and every open stream."""
        with self._lock:
            self._dead = reason
        error = EngineDeadError(f"the engine is not running: {reason}")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(error)
        streams = {child.stream.request_id: child.stream for child in self._children.values()}
        if abort:  # a clean stop frees the blocks; after a crash the engine may not be callable
            for rid in list(self._children):
                self.engine.abort(rid)
        self._children.clear()
        self._deliver([(stream, error) for stream in streams.values()])
        if abort:
            self.metrics.set_snapshot(self.engine.get_stats())
