"""The fleet's ingress: the single server's HTTP app (kvserve/server/app.py) over a FleetClient.

FleetClient is an EngineClient (kvserve/server/engine_client.py) whose add() sends the request's token ids to
an engine replica through Ray Serve's streaming deployment handle; Ray Serve picks the replica with
KVServeRequestRouter (kvserve/fleet/ray_router.py), which reads the block keys computed here, once, with the
engines' hash chain. The replica answers ("accepted", None) or an error item first: a refusal becomes the same
HTTP error as on one server, and a replica that dies before accepting is retried once on another. After that,
outputs are forwarded into the request's RequestStream; a replica lost mid-request ends that request with an
error (503) and nothing else. Aborting the stream cancels the replica call, which aborts the engine request.
With a prefill deployment (--disaggregate P:D), a prefill replica first computes the prompt's KV into the
shared KV store, and the decode replica (chosen by the same router) loads it as a prefix hit.

/metrics: this ingress's own latency histograms and the fleet's summed engine counters (kvserve/fleet/stats.py),
the router's counters, then every replica's exposition with a `replica` label. /health: how many replicas run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from kvserve.engine import EngineLimits
from kvserve.errors import InvalidRequestError
from kvserve.fleet.router_metrics import release_claims
from kvserve.fleet.stats import merge_expositions, sum_stats
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.router.router import request_keys
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import EngineDeadError, QueueFullError
from kvserve.server.metrics import ServerMetrics
from kvserve.server.request_stream import RequestStream

log = logging.getLogger(__name__)


class FleetClient:
    def __init__(
        self,
        handle: Any,
        info: dict[str, Any],
        tokenizer: Tokenizer,
        state: Any,
        app_name: str,
        deployment: str,
        router_registry: Any = None,
        prefill_handle: Any = None,
    ):
        self._handle = handle.options(stream=True)
        self._prefill = None if prefill_handle is None else prefill_handle.options(stream=True)
        self._info = info
        self._tokenizer = tokenizer
        self._state = state
        self._app_name, self._deployment = app_name, deployment
        self._router_registry = router_registry
        self.metrics = ServerMetrics()
        self._calls: dict[str, tuple[Any, asyncio.Task[None]]] = {}

    # ------------------------------------------------------------------------------------ facts
    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self._info["model_names"])

    def limits(self) -> EngineLimits:
        return self._info["limits"]

    def get_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def start(self) -> None:
        pass  # the replicas run already (Serve started them before the ingress)

    def shutdown(self) -> None:
        for response, task in self._calls.values():
            response.cancel()
            task.cancel()

    def stop_soon(self) -> None:
        pass

    async def health(self) -> tuple[bool, str | None, dict[str, Any]]:
        from ray import serve
        from ray.serve._private.common import ReplicaState

        status = (await asyncio.to_thread(serve.status)).applications.get(self._app_name)  # a controller call
        running = 0
        if status is not None and self._deployment in status.deployments:
            running = status.deployments[self._deployment].replica_states.get(ReplicaState.RUNNING, 0)
        reason = None if running else "no engine replica is running"
        return running > 0, reason, {"replicas": running}

    async def render_metrics(self) -> bytes:
        from prometheus_client import generate_latest

        replicas: dict[str, bytes] = {}
        try:
            pulled = await self._state.pull.remote(1 << 62)  # stats only: a cursor past every batch
            self.metrics.set_snapshot(sum_stats(list(pulled.stats.values())))
            replicas = await self._state.metrics.remote()
        except Exception:  # noqa: BLE001 - the ingress's own metrics are still worth serving
            log.warning("could not read the replicas' metrics", exc_info=True)
        fleet = self.metrics.snapshot
        rate = fleet.prefix_hits / fleet.prefix_queries if fleet.prefix_queries else 0.0
        hit_rate = _gauge("fleet_prefix_cache_hit_rate", "Prefix-cache hits / lookups, all replicas.", rate)
        own = [self.metrics.render(), hit_rate]
        if self._router_registry is not None:
            own.append(generate_latest(self._router_registry))
        return merge_expositions(own, replicas, "replica")

    # --------------------------------------------------------------------------------- requests
    async def add(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        stream = RequestStream(request_id or f"fleet-{time.monotonic_ns()}", len(prompts) * params.n, self._abort)
        first = list(prompts[0]) if prompts else []
        payload = {
            "prompts": [list(p) for p in prompts],
            "params": params,
            "cache_salt": cache_salt,
            "request_id": stream.request_id,
            "route": {"keys": request_keys(first, self._info["block_size"], cache_salt), "num_tokens": len(first)},
        }
        if self._prefill is not None and params.prompt_logprobs is None:
            await self._prefill_first(payload)
        for attempt in (0, 1):
            response = self._handle.generate.remote(payload)
            try:
                item = await response.__anext__()
                break
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - the replica died before it accepted: try another
                response.cancel()
                release_claims(payload["request_id"])
                if attempt:
                    raise EngineDeadError(f"no engine replica could take the request: {exc}") from None
                log.warning("replica failed before accepting request %s; retrying: %s", stream.request_id, exc)
        if isinstance(item, dict):
            release_claims(payload["request_id"])
            raise _refusal(item)
        task = asyncio.get_running_loop().create_task(self._forward(response, stream))
        self._calls[stream.request_id] = (response, task)
        return stream

    async def _prefill_first(self, payload: dict[str, Any]) -> None:
        """Disaggregated prefill: a prefill replica computes the prompts' KV (one token each, discarded) and
        writes it through to the shared KV store; the decode replica then finds it there as a prefix hit. A
        failed prefill only costs the decode replica the computation."""
        prefill = {
            **payload,
            "params": SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, speculative=False),
            "request_id": payload["request_id"] + "-prefill",
            "prefill_only": True,
        }
        response = self._prefill.generate.remote(prefill)
        try:
            async for item in response:
                if isinstance(item, dict):
                    release_claims(prefill["request_id"])
                    raise _refusal(item)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except (InvalidRequestError, QueueFullError):
            raise  # the decode replica would refuse it too
        except Exception as exc:  # noqa: BLE001 - decode computes the prompt itself
            log.warning("prefill of %s failed, decoding computes it: %s", payload["request_id"], exc)

    async def _forward(self, response: Any, stream: RequestStream) -> None:
        first_token: dict[int, float] = {}
        try:
            async for item in response:
                if isinstance(item, dict):
                    stream.put(_refusal(item))
                    return
                index, out = item
                self._observe(stream, index, out, first_token)
                stream.put((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the replica died mid-request: this request fails, alone
            stream.put(EngineDeadError(f"the engine replica serving this request failed: {exc}"))
        finally:
            self._calls.pop(stream.request_id, None)

    def _observe(self, stream: RequestStream, index: int, out: RequestOutput, last: dict[int, float]) -> None:
        now, n = time.monotonic(), len(out.outputs[0].token_ids)
        if n:
            if index not in last:
                self.metrics.observe_first_token(now - stream.arrival_time)
            else:
                self.metrics.observe_next_tokens(n, now - last[index])
            last[index] = now
        if out.finished:
            reason = out.outputs[0].finish_reason or "error"
            self.metrics.observe_finished(reason, now - stream.arrival_time, out.num_prompt_tokens_computed)

    def _abort(self, stream: RequestStream) -> None:
        call = self._calls.pop(stream.request_id, None)
        if call is not None:
            response, task = call
            response.cancel()  # Serve cancels the replica's generator, which aborts the engine request
            task.cancel()
            self.metrics.observe_finished("abort", time.monotonic() - stream.arrival_time)


def _gauge(name: str, doc: str, value: float) -> bytes:
    return f"# HELP kvserve:{name} {doc}\n# TYPE kvserve:{name} gauge\nkvserve:{name} {value}\n".encode()


def _refusal(item: dict[str, Any]) -> Exception:
    kind, message = item.get("error"), item.get("message", "")
    if kind == "invalid":
        error = InvalidRequestError(message, param=item.get("param"))
        error.code = item.get("code")
        return error
    if kind == "busy":
        error = QueueFullError(0, 0)
        error.args = (message,)
        return error
    return EngineDeadError(message)
