"""Routing policies: which replica serves a request, from its prefix matches and the replicas' load.

Plain classes with no Ray import (kvserve/fleet/ray_router.py binds them to Ray Serve's RequestRouter; the
simulator in bench/routing.py drives the same classes), each a `choose(request, replicas, matches)`:

  round-robin   in turn, ignoring everything: the baseline that spreads each prefix over every replica;
  least-load    fewest requests in flight (running + waiting + routed and not yet reported), KV usage breaks ties;
  prefix-aware  the longest cached prefix wins (least-load among equals): best hit rate, but a hot prefix pins
                every request to the one replica that holds it;
  cache-aware   the lowest estimated cost of serving the request there, in prompt tokens of prefill work
                (a proxy for its time to first token):
                  cost(r) = uncached prompt tokens on r            (this request's own prefill there)
                          + queued prompt tokens on r              (prefill admitted or routed, not yet computed)
                          + RUNNING_COST x requests on r           (each running sequence lengthens every step)
                          + a KV-pressure term once r's pool is nearly full (its cached prefixes are being
                            evicted and its requests may be preempted)
                so a long cached match wins until its replica's queue is longer than the match is worth; then the
                request goes elsewhere and that replica caches the prefix too (a hot prefix spreads).

The constants are in prefill-token units from the step-time model fitted on this machine (bench/routing.py
--calibrate; docs/scale-out.md): a step costs base + per-prefill-token x tokens + per-sequence x sequences, and a
newcomer waits about (queued + uncached) / budget steps, each longer by per-sequence x running; per-sequence
is about half a prefill token's cost, and the requests in flight also stand for work not yet reported, hence
RUNNING_COST = 8. KV pressure starts at 90% usage and is worth 4,096 tokens at 100% (a full pool evicts the
prefixes that make hits and preempts, which costs recomputation).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RUNNING_COST = 8  # prefill tokens a request on a replica is worth (see the module docstring)
KV_PRESSURE_START = 0.9  # KV usage above which a replica is penalised
KV_PRESSURE_COST = 4096  # prefill tokens added at 100% KV usage (linear from KV_PRESSURE_START)


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """What the router knows of one replica's load: reported by its engine (a little late) and counted
    locally (requests routed there and not finished: exact and fresh)."""

    replica: str
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0  # prompt tokens admitted and not yet computed
    kv_usage: float = 0.0  # fraction of KV blocks held by requests
    in_flight: int = 0  # routed by this router and not finished

    @property
    def requests(self) -> int:
        """Requests on the replica: the larger of what it reported and what this router sent it."""
        return max(self.running + self.waiting, self.in_flight)


@dataclass(frozen=True)
class RouteRequest:
    """What routing sees of a request: its prompt's block keys (kvserve/kv/events.py) and length."""

    block_keys: Sequence[int]
    num_tokens: int
    block_size: int


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # "round-robin" | "least-load" | "prefix" | "cost" | "no-match" (for the decisions metric)
    matched_tokens: int  # prompt tokens the chosen replica holds (per the index)


class RoutingPolicy:
    """Chooses one replica; replicas is never empty. matches: replica -> leading blocks it holds."""

    name = "base"

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], matches: Mapping[str, int]) -> Decision:
        raise NotImplementedError

    @staticmethod
    def _matched_tokens(request: RouteRequest, blocks: int) -> int:
        return min(blocks * request.block_size, request.num_tokens)


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], matches: Mapping[str, int]) -> Decision:
        ordered = sorted(replicas, key=lambda r: r.replica)  # a stable order whatever the caller's
        r = ordered[next(self._turn) % len(ordered)]
        return Decision(r.replica, "round-robin", self._matched_tokens(request, matches.get(r.replica, 0)))


def _least_loaded(replicas: Sequence[ReplicaLoad]) -> ReplicaLoad:
    return min(replicas, key=lambda r: (r.requests, r.kv_usage, r.replica))


class LeastLoad(RoutingPolicy):
    name = "least-load"

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], matches: Mapping[str, int]) -> Decision:
        r = _least_loaded(replicas)
        return Decision(r.replica, "least-load", self._matched_tokens(request, matches.get(r.replica, 0)))


class PrefixAware(RoutingPolicy):
    name = "prefix-aware"

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], matches: Mapping[str, int]) -> Decision:
        best = max((matches.get(r.replica, 0) for r in replicas), default=0)
        if best == 0:
            r = _least_loaded(replicas)
            return Decision(r.replica, "no-match", 0)
        r = _least_loaded([r for r in replicas if matches.get(r.replica, 0) == best])
        return Decision(r.replica, "prefix", self._matched_tokens(request, best))


class CacheAware(RoutingPolicy):
    name = "cache-aware"

    def __init__(
        self,
        running_cost: float = RUNNING_COST,
        kv_pressure_start: float = KV_PRESSURE_START,
        kv_pressure_cost: float = KV_PRESSURE_COST,
    ):
        self.running_cost = running_cost
        self.kv_pressure_start = kv_pressure_start
        self.kv_pressure_cost = kv_pressure_cost

    def cost(self, request: RouteRequest, r: ReplicaLoad, matched_blocks: int) -> float:
        """Estimated prefill-token-equivalents of work before (and for) this request's first token on r."""
        uncached = request.num_tokens - self._matched_tokens(request, matched_blocks)
        pressure = max(0.0, r.kv_usage - self.kv_pressure_start) / max(1e-9, 1 - self.kv_pressure_start)
        return uncached + r.queued_tokens + self.running_cost * r.requests + self.kv_pressure_cost * pressure

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], matches: Mapping[str, int]) -> Decision:
        # cost() inlined: this loop runs over every replica for every request (128 replicas: ~1 us each)
        n, bs, running_cost = request.num_tokens, request.block_size, self.running_cost
        start, span, pressure_cost = (
            self.kv_pressure_start,
            max(1e-9, 1 - self.kv_pressure_start),
            self.kv_pressure_cost,
        )
        best_key, best, best_matched = None, replicas[0], 0
        for r in replicas:
            matched = min(matches.get(r.replica, 0) * bs, n)
            requests = max(r.running + r.waiting, r.in_flight)
            cost = n - matched + r.queued_tokens + running_cost * requests
            if r.kv_usage > start:
                cost += pressure_cost * (r.kv_usage - start) / span
            key = (cost, requests, r.replica)
            if best_key is None or key < best_key:
                best_key, best, best_matched = key, r, matched
        top = self._matched_tokens(request, max(matches.values(), default=0))
        reason = "no-match" if top == 0 else "prefix" if best_matched == top else "cost"
        return Decision(best.replica, reason, best_matched)


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RoundRobin, LeastLoad, PrefixAware, CacheAware)}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
