"""KVServeRequestRouter: kvserve's routing policies (kvserve/router/) on Ray Serve's own extension point.

Ray Serve builds one per deployment handle, in the caller's process (the ingress): choose_replicas() ranks the
candidate engine replicas for one request. It reads the request's block keys and prompt length from the
payload (the ingress computed them with the engines' hash chain), the replicas' load from the FleetState
actor (engine-reported) and from its own count of requests in flight, and asks the Router. The KV events the
replicas published are pulled from FleetState at most every PULL_PERIOD_S, on the routing path itself (one
actor call, no background task to manage).

The decision's replica is the first rank; the others follow as a fallback (Serve tries them if the first is
full or gone). Counters for /metrics live in kvserve/fleet/router_metrics.py (same process as the ingress,
which renders them). Ray pickles this module by value to ship the class: it holds no state of its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvserve.fleet import router_metrics
from kvserve.router.policies import ReplicaLoad, RouteRequest
from kvserve.router.router import Router

log = logging.getLogger(__name__)

PULL_PERIOD_S = 0.05


class KVServeRequestRouter(RequestRouter):
    # Serve probes a chosen replica's queue length before sending; an engine replica busy with a step can take
    # longer than the default 0.1 s to answer on 2 cores, and a missed deadline costs a routing retry
    queue_len_response_deadline_s = 0.5

    def initialize_state(
        self, policy: str = "cache-aware", block_size: int = 16, state_name: str = "", state_namespace: str = ""
    ) -> None:
        self._router = Router(policy, block_size)
        self._state_name, self._state_namespace = state_name, state_namespace
        self._state: Any = None
        self._cursor = 0
        self._last_pull = 0.0
        self._loads: dict[str, Any] = {}  # replica -> EngineStats
        self._in_flight: Tally[str] = Tally()
        self._routed: dict[str, str] = {}  # internal request id -> replica
        self._decided: dict[str, tuple[str, RouteRequest, Any]] = {}  # internal id -> (request id, request, decision)
        self._claims: dict[str, tuple[RouteRequest, Any, str]] = {}  # request id -> (request, decision, replica)
        router_metrics.ROUTERS.add(self)

    async def _pull(self) -> None:
        now = time.monotonic()
        if now - self._last_pull < PULL_PERIOD_S or not self._state_name:
            return
        self._last_pull = now
        try:
            if self._state is None:
                import ray

                self._state = ray.get_actor(self._state_name, namespace=self._state_namespace or None)
            pulled = await self._state.pull.remote(self._cursor)
        except Exception:  # noqa: BLE001 - route on what we know; the next pull retries
            log.warning("could not pull KV events from the fleet state", exc_info=True)
            return
        self._cursor = pulled.cursor
        for replica, batch in pulled.batches:
            if replica in self._replicas_by_name():
                self._router.apply(replica, batch)
        self._loads = pulled.stats
        for replica, covers in pulled.covers.items():
            self._router.reported(replica, covers)  # its queued tokens now count what we sent before `covers`
        router_metrics.ROUTER_METRICS.index_blocks.set(len(self._router.index))

    def _replicas_by_name(self) -> dict[str, RunningReplica]:
        return {r.replica_id.unique_id: r for r in self.curr_replicas.values()}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        route = _route_of(pending_request)
        if route is None or not candidate_replicas:
            return [candidate_replicas]
        await self._pull()
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [self._load(name) for name in by_name]
        request = RouteRequest(route["keys"], route["num_tokens"], self._router.block_size)
        decision = self._router.route(request, loads)
        router_metrics.ROUTER_METRICS.decisions.labels(policy=self._router.policy.name, reason=decision.reason).inc()
        router_metrics.ROUTER_METRICS.matched.inc(decision.matched_tokens)
        if len(self._decided) > 4096:  # requests cancelled before Serve sent them: drop the oldest
            self._decided.pop(next(iter(self._decided)))
        payload_id = pending_request.args[0].get("request_id", "")
        self._decided[pending_request.metadata.internal_request_id] = (payload_id, request, decision)
        first = by_name[decision.replica]
        return [[first], [r for r in candidate_replicas if r is not first]]

    def _load(self, name: str) -> ReplicaLoad:
        stats = self._loads.get(name)
        if stats is None:
            return ReplicaLoad(name, in_flight=self._in_flight[name])
        return ReplicaLoad(
            name,
            running=stats.num_running,
            waiting=stats.num_waiting,
            queued_tokens=stats.num_queued_tokens,
            kv_usage=stats.kv_cache_usage,
            in_flight=self._in_flight[name],
        )

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        name, rid = replica_id.unique_id, pending_request.metadata.internal_request_id
        self._in_flight[name] += 1
        self._routed[rid] = name
        decided = self._decided.pop(rid, None)
        if decided is not None:  # Serve may have fallen back to another rank: claims follow the request
            payload_id, request, decision = decided
            self._router.moved(request, decision, name)
            self._claims[payload_id] = (request, decision, name)  # kept for a refusal that may follow
            if len(self._claims) > 4096:  # the oldest ran long ago: their blocks are the events' business now
                self._claims.pop(next(iter(self._claims)))

    def release(self, request_id: str) -> None:
        """The request never ran where it was sent: its claimed blocks go (kvserve/fleet/router_metrics.py)."""
        claim = self._claims.pop(request_id, None)
        if claim is not None:
            self._router.unclaim(*claim)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        name = self._routed.pop(internal_request_id, None)
        if name is not None and self._in_flight[name] > 0:
            self._in_flight[name] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if not hasattr(self, "_router"):  # before initialize_state: nothing indexed yet
            return
        live = {r.replica_id.unique_id for r in replicas}
        self._router.set_replicas(live)  # a replica that left (or died) takes its index entries with it
        for name in [n for n in self._in_flight if n not in live]:
            del self._in_flight[name]


def _route_of(pending_request: PendingRequest | None) -> dict[str, Any] | None:
    if pending_request is None or not pending_request.args:
        return None
    payload = pending_request.args[0]
    return payload.get("route") if isinstance(payload, dict) else None
