"""A fleet simulator for bench/routing.py: kvserve's real routing policies in front of modelled engines.

Each modelled engine is kvserve's own Scheduler, KVCacheManager and BlockPool (LRU eviction, real pool size)
with the forward pass replaced by a step-time model calibrated on this machine
  step seconds = base + per_prefill_token x prefill tokens + per_sequence x sequences in the batch,
and its KV events feed the router's index after every step, as a replica's publisher does. Requests arrive
on a Poisson clock; a request is routed when it arrives, with the load the engines report (running, waiting)
plus the router's own count of requests in flight.

Baselines beside kvserve's four policies:
  pow2          Ray Serve's default: two random replicas, the one with fewer requests;
  ray-prefix    Ray's PrefixCacheAffinityRouter logic over Ray's own PrefixTree class (character-level, fed by
                routing decisions only, LRU-trimmed at its documented 400,000 characters per replica; match
                rate >= 0.1 -> the matching replicas, else the replicas with the smallest trees; then the one
                with fewer requests; load imbalance threshold: its default, infinite).
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.kv.events import KVEventLog
from kvserve.kv.hashing import hash_block_chain
from kvserve.request import Request, RequestStatus
from kvserve.router.policies import ReplicaLoad, RouteRequest
from kvserve.router.router import Router
from kvserve.sampling_params import SamplingParams
from kvserve.scheduler import Scheduler, SchedulerLimits


@dataclass(frozen=True)
class StepModel:
    base: float = 0.010  # seconds per step
    per_prefill_token: float = 0.0006
    per_sequence: float = 0.0003

    def seconds(self, prefill_tokens: int, sequences: int) -> float:
        return self.base + self.per_prefill_token * prefill_tokens + self.per_sequence * sequences


@dataclass
class TraceRequest:
    arrival: float
    tokens: list[int]
    output_len: int


@dataclass
class Outcome:
    arrival: float
    replica: str
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None


class SimEngine:
    def __init__(self, name: str, num_blocks: int, block_size: int, max_num_seqs: int = 64):
        self.name = name
        self.pool = BlockPool(num_blocks)
        self.pool.events = KVEventLog()
        self.kv = KVCacheManager(self.pool, block_size)
        self.scheduler = Scheduler(SchedulerLimits(2048, max_num_seqs), self.kv)
        self.busy_until: float | None = None
        self.outcomes: dict[str, Outcome] = {}

    def load(self, in_flight: int) -> ReplicaLoad:
        s = self.scheduler
        return ReplicaLoad(
            self.name,
            running=len(s.running),
            waiting=len(s.waiting),
            queued_tokens=self.queued_tokens(),
            kv_usage=self.pool.usage,
            in_flight=in_flight,
        )

    def queued_tokens(self) -> int:
        s = self.scheduler
        return sum(r.num_tokens - r.num_computed_tokens for r in [*s.running, *s.waiting])

    def step(self, now: float, model: StepModel) -> tuple[float, list[str]] | None:
        """Run one scheduling step starting at `now`; returns its duration and the requests it finished, or None
        when idle."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        sampling = [s.request for s in sched.scheduled if s.samples]
        prefill = sum(s.num_new_tokens for s in sched.scheduled if not s.samples or s.num_new_tokens > 1)
        for s in sched.scheduled:
            o = self.outcomes[s.request.request_id]
            if o.admitted is None:
                o.admitted = now
        seconds = model.seconds(prefill, len(sched.scheduled))
        self.scheduler.update_after_step(sched)
        end, finished = now + seconds, []
        for request in sampling:
            request.append_output_token(7)
            o = self.outcomes[request.request_id]
            if o.first_token is None:
                o.first_token = end
            if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                request.status = RequestStatus.FINISHED_LENGTH
                self.scheduler.finish_request(request, request.status)
                o.finished = end
                finished.append(request.request_id)
        return seconds, finished


@dataclass
class SimResult:
    policy: str
    replicas: int
    hit_rate: float
    imbalance: float  # mean over arrivals of max / mean queued tokens
    p99_queueing_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    route_us: float  # mean routing cost per request
    requests_per_replica: list[int] = field(default_factory=list)


class Pow2:
    name = "pow2"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def route(self, request: TraceRequest, loads: Sequence[ReplicaLoad]) -> str:
        pair = self.rng.sample(list(loads), 2) if len(loads) > 1 else list(loads)
        return min(pair, key=lambda r: r.requests).replica


class RayPrefixTree:
    """Ray's PrefixCacheAffinityRouter decision over Ray's PrefixTree (see the module docstring)."""

    name = "ray-prefix"
    MATCH_RATE = 0.1
    EVICT_CHARS = 400_000

    def __init__(self, replicas: Sequence[str]):
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

        self.tree = PrefixTree()
        self.tree.add_tenants(list(replicas), time.time())

    def route(self, request: TraceRequest, loads: Sequence[ReplicaLoad]) -> str:
        text = " ".join(map(str, request.tokens))
        by_name = {r.replica: r for r in loads}
        matched, tenants = self.tree.prefix_match(text, list(by_name))
        if len(matched) / max(1, len(text)) < self.MATCH_RATE or not tenants:
            tenants = self.tree.get_smallest_tenants() or list(by_name)
        choice = min((by_name[t] for t in tenants if t in by_name), key=lambda r: r.requests).replica
        self.tree.insert(text, choice, time.time())
        size = self.tree.tenant_to_char_count.get(choice, 0)
        if size > self.EVICT_CHARS:
            self.tree.evict_tenant_by_lru(choice, size - self.EVICT_CHARS)
        return choice


def simulate(
    policy: str,
    trace: Sequence[TraceRequest],
    replicas: int,
    num_blocks: int,
    block_size: int,
    model: StepModel,
    seed: int = 0,
) -> SimResult:
    names = [f"r{i:03d}" for i in range(replicas)]
    engines = {n: SimEngine(n, num_blocks, block_size) for n in names}
    router = Router(policy, block_size) if policy not in ("pow2", "ray-prefix") else None
    baseline = Pow2(seed) if policy == "pow2" else RayPrefixTree(names) if policy == "ray-prefix" else None
    in_flight = dict.fromkeys(names, 0)
    events: list[tuple[float, int, str, object]] = [(r.arrival, i, "arrive", r) for i, r in enumerate(trace)]
    heapq.heapify(events)
    seq = len(trace)
    route_seconds, imbalance = 0.0, []
    done: dict[str, list[str]] = {}  # engine -> requests its running step finishes
    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(item, TraceRequest)
            loads = [engines[n].load(in_flight[n]) for n in names]
            t0 = time.perf_counter()
            if router is not None:
                name = router.route(RouteRequest(_keys(item, block_size), len(item.tokens), block_size), loads).replica
            else:
                name = baseline.route(item, loads)
            route_seconds += time.perf_counter() - t0
            queued = [engines[n].queued_tokens() for n in names]
            mean = sum(queued) / len(queued)
            if mean > 0:
                imbalance.append(max(queued) / mean)
            engine, rid = engines[name], f"q{_}"
            request = Request(rid, item.tokens, SamplingParams(max_tokens=item.output_len, ignore_eos=True))
            engine.outcomes[rid] = Outcome(now, name)
            engine.scheduler.add_request(request)
            in_flight[name] += 1
            if router is not None:
                router.reported(name)  # the modelled engines' load is never stale: nothing is pending
            if engine.busy_until is None:
                seq += 1
                heapq.heappush(events, (now, seq, "step", name))
        else:
            engine = engines[item]
            if engine.busy_until is not None and kind == "done":
                engine.busy_until = None
                in_flight[engine.name] -= len(done.pop(engine.name, ()))
                if router is not None and (batch := engine.pool.events.drain()) is not None:
                    router.apply(engine.name, batch)
            if engine.busy_until is not None:
                continue
            stepped = engine.step(now, model)
            if stepped is not None:
                seconds, done[engine.name] = stepped
                engine.busy_until = now + seconds
                seq += 1
                heapq.heappush(events, (now + seconds, seq, "done", item))
    return _result(policy, engines, route_seconds / max(1, len(trace)), imbalance)


def _keys(request: TraceRequest, block_size: int) -> list[int]:
    from kvserve.kv.events import block_key

    return [block_key(h) for h in hash_block_chain(request.tokens, block_size)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _result(policy: str, engines: dict[str, SimEngine], route_s: float, imbalance: list[float]) -> SimResult:
    hits = sum(e.kv.prefix_hits for e in engines.values())
    queries = sum(e.kv.prefix_queries for e in engines.values())
    outcomes = [o for e in engines.values() for o in e.outcomes.values()]
    queueing = [o.admitted - o.arrival for o in outcomes if o.admitted is not None]
    ttft = [o.first_token - o.arrival for o in outcomes if o.first_token is not None]
    return SimResult(
        policy=policy,
        replicas=len(engines),
        hit_rate=hits / queries if queries else 0.0,
        imbalance=sum(imbalance) / len(imbalance) if imbalance else 1.0,
        p99_queueing_s=_percentile(queueing, 0.99),
        p50_ttft_s=_percentile(ttft, 0.5),
        p99_ttft_s=_percentile(ttft, 0.99),
        route_us=route_s * 1e6,
        requests_per_replica=sorted((len(e.outcomes) for e in engines.values()), reverse=True),
    )


def single_engine_hit_rate(trace: Sequence[TraceRequest], num_blocks: int, block_size: int) -> float:
    """The reference: one pool with the fleet's total memory, requests served one after another."""
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, block_size)
    for i, item in enumerate(trace):
        request = Request(f"s{i}", item.tokens, SamplingParams(max_tokens=1))
        computed = kv.get_computed_blocks(request)
        kv.record_query(request, computed)
        kv.allocate_slots(request, request.num_tokens - computed.num_tokens, computed)
        request.num_computed_tokens = request.num_tokens
        kv.cache_computed_blocks(request)
        kv.free(request)
    return kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0


def document_qa_trace(
    replicas: int, seed: int = 0, per_replica: int = 30, rate_per_replica: float = 1.2
) -> list[TraceRequest]:
    """Questions about documents (1,000-2,000 tokens, Zipf-popular, 40 per replica) with 20-60-token questions
    and 64 output tokens, Poisson arrivals."""
    rng = random.Random(seed)
    docs = [[rng.randrange(1, 49_000) for _ in range(rng.randrange(1000, 2000))] for _ in range(40 * replicas)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(docs))]
    t, out = 0.0, []
    for _ in range(per_replica * replicas):
        t += rng.expovariate(rate_per_replica * replicas)
        doc = rng.choices(docs, weights)[0]
        question = [rng.randrange(1, 49_000) for _ in range(rng.randrange(20, 60))]
        out.append(TraceRequest(t, doc + question, 64))
    return out
