"""Prometheus metrics of the server, all named ``kvserve:*``, in a registry of their own.

Two sources:
  per-request latencies and recomputed prompt tokens (histograms) and finish reasons (counter), observed by
  the engine thread as outputs come out of LLMEngine.step();
  engine counters and gauges (tokens, prefix cache, preemptions, evictions, KV usage, queue lengths, and for
  hybrid models the recurrent-state checkpoints and their current placement), rendered at scrape time from
  the EngineStats snapshot (kvserve/stats.py) that the engine thread takes after every step. The scrape never
  touches the (not thread-safe) engine itself, and the counters are the engine's own, so they cannot drift.

The placement is an info-style gauge (value 1, the facts in labels, as `python_info` or kube-state-metrics'
`*_info`): `kvserve:recurrent_checkpoint_placement_info{policy="optimal:4",depths="3,17,40,128"} 1`, depths
in blocks, empty for rules that depend on the prompt length (every-block:B, sqrt, log) and for none. Only
the current placement is exposed, so the label set changes only when a learned placement is re-solved to
new depths (`kvserve:recurrent_checkpoint_placement_changes_total` counts those changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from kvserve.stats import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)
RECOMPUTED_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineStats]):
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # names are fixed; skip the collect() prometheus-client would otherwise run at register()

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        counters = [
            ("prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens),
            ("generation_tokens", "Generated tokens.", s.generation_tokens),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits),
            ("num_preemptions", "Requests preempted for want of KV blocks.", s.num_preemptions),
            ("kv_blocks_evicted", "Cached KV blocks evicted to make room.", s.num_evictions),
            ("batch_retries", "Steps whose batch failed and was retried one request at a time.", s.num_failed_batches),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"kvserve:{name}", doc, value=value)
        gauges = [
            ("kv_cache_usage_perc", "Fraction (0..1) of KV blocks held by running requests.", s.kv_cache_usage),
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled (preempted ones included).", s.num_waiting),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"kvserve:{name}", doc, value=value)
        yield from _tier_metrics(s)
        yield from _checkpoint_metrics(s)
        yield from _spec_metrics(s)


def _spec_metrics(s: EngineStats) -> Iterator[Metric]:
    """Speculative decoding (absent without --speculative)."""
    sd = s.spec_decode
    if sd is None:
        return
    yield CounterMetricFamily("kvserve:spec_decode_draft_tokens", "Draft tokens verified.", value=sd.draft_tokens)
    doc = "Draft tokens accepted (each one a token without its own decode step)."
    yield CounterMetricFamily("kvserve:spec_decode_accepted_tokens", doc, value=sd.accepted_tokens)
    per_pos = CounterMetricFamily(
        "kvserve:spec_decode_accepted_tokens_per_pos",
        "Steps that accepted the draft at this position (0 = the first draft after the last token).",
        labels=["position"],
    )
    for j, n in enumerate(sd.accepted_per_position):
        per_pos.add_metric([str(j)], n)
    yield per_pos


def _checkpoint_metrics(s: EngineStats) -> Iterator[Metric]:
    """Recurrent-state checkpoints of hybrid models and their placement (absent otherwise)."""
    p = s.placement
    if p is not None:
        info = GaugeMetricFamily(
            "kvserve:recurrent_checkpoint_placement_info",
            "Where prefill snapshots recurrent state: the policy and the depths (blocks) it places now; depths is "
            "empty for rules that depend on the prompt length. Always 1.",
            labels=["policy", "depths", "block_size"],
        )
        depths = "" if p.depths is None else ",".join(map(str, p.depths))
        info.add_metric([p.policy, depths, str(p.block_size)], 1)
        yield info
        doc = "Times a learned checkpoint placement changed its depths."
        yield CounterMetricFamily("kvserve:recurrent_checkpoint_placement_changes", doc, value=p.changes)
    c = s.checkpoints
    if c is None:
        return
    counters = [
        ("recurrent_checkpoints_stored", "Recurrent-state snapshots stored.", "stored"),
        ("recurrent_checkpoint_hits", "Admissions that resumed from a recurrent-state checkpoint.", "hits"),
        ("recurrent_checkpoint_misses", "Admissions with a KV prefix hit but no checkpoint under it.", "misses"),
        ("recurrent_checkpoints_evicted", "Snapshots evicted from the checkpoint store (LRU) or reset.", "evicted"),
        ("recurrent_resumed_tokens", "Prompt tokens skipped by resuming from checkpoints.", "resumed_tokens"),
    ]
    for name, doc, key in counters:
        yield CounterMetricFamily(f"kvserve:{name}", doc, value=getattr(c, key))
    yield GaugeMetricFamily("kvserve:recurrent_checkpoint_bytes", "Bytes held by the checkpoint store.", c.bytes)


def _tier_metrics(s: EngineStats) -> Iterator[Metric]:
    """Per-tier counters (label tier = cpu | disk | redis); absent when no tier is configured."""
    if not s.tiers:
        return
    per_tier = [
        ("kv_tier_hits", "KV blocks found in this tier and loaded back into the pool.", "hits"),
        ("kv_tier_misses", "Lookups that reached this tier and stopped in it.", "misses"),
        ("kv_tier_bytes_loaded", "Bytes read from this tier.", "bytes_loaded"),
        ("kv_tier_bytes_stored", "Bytes written to this tier.", "bytes_stored"),
        ("kv_tier_evictions", "KV blocks this tier dropped for room.", "evictions"),
    ]
    for name, doc, attr in per_tier:
        m = CounterMetricFamily(f"kvserve:{name}", doc, labels=["tier"])
        for tier, st in s.tiers.items():
            m.add_metric([tier], getattr(st, attr))
        yield m
    faults = CounterMetricFamily(
        "kvserve:kv_tier_faults",
        "Tier faults, each treated as a miss: unavailable (I/O error, full disk, Redis down), corrupt (failed "
        "verification), dropped_write (writer behind).",
        labels=["tier", "kind"],
    )
    for tier, st in s.tiers.items():
        faults.add_metric([tier, "unavailable"], st.errors)
        faults.add_metric([tier, "corrupt"], st.corrupt)
        faults.add_metric([tier, "dropped_write"], st.dropped_writes)
    yield faults
    latency = SummaryMetricFamily(
        "kvserve:kv_tier_load_seconds", "Time to fetch, verify and copy back one lookup's hits.", labels=["tier"]
    )
    for tier, st in s.tiers.items():
        latency.add_metric([tier], count_value=st.loads, sum_value=st.load_seconds)
    yield latency
    if "cpu" in s.tiers:
        doc = "Bytes held by the host-RAM tier."
        yield GaugeMetricFamily("kvserve:kv_tier_cpu_bytes", doc, value=s.host_tier_bytes)


class ServerMetrics:
    """Everything /metrics exposes. Thread-safe: observed on the engine thread, rendered on the event loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(
            "kvserve:time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "kvserve:time_per_output_token_seconds", "Gap between tokens.", buckets=TPOT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "kvserve:e2e_request_latency_seconds", "Arrival to finish.", buckets=E2E_BUCKETS, registry=r
        )
        self.recomputed = Histogram(
            "kvserve:recomputed_prompt_tokens",
            "Prompt tokens a finished request computed (not served from the prefix cache), recomputation after a "
            "preemption included.",
            buckets=RECOMPUTED_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "kvserve:request_success",
            "Finished engine requests (one per choice) by finish reason: stop, length, abort, error.",
            ["finished_reason"],
            registry=r,
        )
        for reason in ("stop", "length", "abort", "error"):  # series exist at 0 from the start, as vLLM's do
            self.finished.labels(finished_reason=reason)
        self._snapshot = EngineStats()
        self.registry.register(_SnapshotCollector(lambda: self._snapshot))

    def set_snapshot(self, snapshot: EngineStats) -> None:
        self._snapshot = snapshot

    @property
    def snapshot(self) -> EngineStats:
        """The engine's counters and gauges as last set (readable from any thread)."""
        return self._snapshot

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_next_tokens(self, num_new: int, seconds: float) -> None:
        """num_new tokens arrived `seconds` after the previous one (one per step without speculation)."""
        for _ in range(num_new):
            self.tpot.observe(seconds / num_new)

    def observe_finished(self, reason: str, e2e_seconds: float, recomputed_prompt_tokens: int | None = None) -> None:
        """One engine request finished; recomputed_prompt_tokens = prompt tokens - cached tokens, when known."""
        self.finished.labels(finished_reason=reason).inc()
        if reason != "abort":
            self.e2e.observe(e2e_seconds)
            if recomputed_prompt_tokens is not None:
                self.recomputed.observe(recomputed_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
