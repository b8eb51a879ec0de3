"""EngineReplica: one engine in a Ray Serve deployment replica, serving token ids to the fleet's ingress.

  generate(payload)    an async generator (Serve streams it back through the ingress's handle):
                         first ("accepted", None) once the engine queued the request, or an error item;
                         then (index, RequestOutput) deltas until every choice finished
  generate({..., "prefill_only": True})   a prefill replica's part of a disaggregated request: the prompt's KV
                       is computed, written through to the shared KV store, and flushed before the last item
  info()               what the ingress needs to validate requests: limits, model names, block size
  check_health()       Serve's health check: the engine thread is alive (else Serve replaces the replica)

Every PUBLISH_PERIOD_S it publishes its KV events, engine stats and /metrics to the FleetState actor
(kvserve/fleet/state.py), which the routers and the ingress read. The engine itself is the single server's
AsyncEngine: the same step thread, queue limits and abort-on-cancel (a cancelled generator aborts its request,
so a dropped client's KV blocks are freed at once on this replica too).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from kvserve.config import EngineConfig
from kvserve.errors import InvalidRequestError
from kvserve.fleet.state import PUBLISH_PERIOD_S
from kvserve.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from kvserve.server.request_stream import RequestAbortedError

log = logging.getLogger(__name__)


def error_item(exc: BaseException) -> dict[str, Any]:
    """A refusal or failure as a plain item the ingress turns back into the same HTTP error."""
    if isinstance(exc, QueueFullError):
        return {"error": "busy", "message": str(exc)}
    if isinstance(exc, InvalidRequestError):
        return {"error": "invalid", "message": str(exc), "param": exc.param, "code": exc.code}
    if isinstance(exc, ValueError):
        return {"error": "invalid", "message": str(exc), "param": None, "code": None}
    return {"error": "dead", "message": str(exc)}


class EngineReplica:
    def __init__(self, engine_config: dict[str, Any], max_waiting_requests: int, threads: int, state: tuple[str, str]):
        import ray
        import torch
        from ray import serve

        torch.set_num_threads(threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._state = ray.get_actor(state[0], namespace=state[1])
        self._pending: list[Any] = []  # KV event batches from the engine thread
        self._pending_lock = threading.Lock()
        self.engine = AsyncEngine.from_config(
            EngineConfig(**engine_config), max_waiting_requests=max_waiting_requests, kv_event_sink=self._on_events
        )
        self._publisher: asyncio.Task[None] | None = None

    def _on_events(self, batch: Any) -> None:  # engine thread
        with self._pending_lock:
            self._pending.append(batch)

    def _ensure_started(self) -> None:
        """Start the engine thread and the publisher on the replica's event loop (first call)."""
        if self._publisher is None:
            self.engine.start()
            self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

    async def _publish_forever(self) -> None:
        while True:
            with self._pending_lock:
                batches, self._pending = self._pending, []
            try:
                engine = self.engine
                covers = engine.snapshot_covers
                self._state.publish.remote(
                    self.replica_id, batches, engine.metrics.snapshot, engine.metrics.render(), covers
                )
            except Exception:  # noqa: BLE001 - the state actor is gone (shutting down): keep serving
                log.warning("could not publish to the fleet state", exc_info=True)
            await asyncio.sleep(PUBLISH_PERIOD_S)

    async def info(self) -> dict[str, Any]:
        self._ensure_started()
        e = self.engine.engine
        return {"limits": e.limits(), "model_names": e.model_names, "block_size": e.block_size}

    def check_health(self) -> None:
        if self._publisher is not None and not self.engine.is_healthy:
            raise RuntimeError(f"the engine is not running: {self.engine.dead_reason}")

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[Any]:
        self._ensure_started()
        try:
            stream = await self.engine.add(
                payload["prompts"],
                payload["params"],
                cache_salt=payload.get("cache_salt"),
                request_id=payload["request_id"],
            )
        except Exception as exc:  # noqa: BLE001 - every refusal goes back as an item the ingress maps
            yield error_item(exc)
            return
        yield ("accepted", None)
        try:
            async for index, out in stream:
                yield (index, out)
        except (EngineDeadError, RequestAbortedError) as exc:
            yield error_item(exc)
            return
        finally:
            stream.abort()  # cancelled (client gone) or failed: free the request's blocks now
        if payload.get("prefill_only"):  # disaggregated: the decode replica reads these blocks from the store
            await asyncio.to_thread(self.engine.engine.flush_kv_store)
            yield ("stored", None)
