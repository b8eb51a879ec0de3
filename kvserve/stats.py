"""EngineStats: the engine's counters and gauges at one instant, as plain values (a snapshot).

LLMEngine.get_stats() takes it on the engine's thread; readers on other threads (the server's /metrics,
benchmarks, tests) only read the snapshot, never the engine. Counters are totals since start.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TierCounters:
    """One KV tier below the pool (cpu, disk or redis): blocks and bytes since start. The tiered cache keeps
    one per tier and counts into it; a snapshot holds copies."""

    hits: int = 0  # blocks found and loaded back
    misses: int = 0  # lookups that reached this tier and stopped in it
    bytes_loaded: int = 0
    bytes_stored: int = 0
    stores: int = 0  # blocks written
    evictions: int = 0  # blocks dropped by this tier for room
    loads: int = 0  # lookups that loaded at least one block
    load_seconds: float = 0.0  # sum over those lookups: fetch + verify + copy into the pool
    errors: int = 0  # backend failures (I/O error, full disk, Redis down)
    corrupt: int = 0  # entries that failed verification
    dropped_writes: int = 0  # writes skipped because the writer was behind


@dataclass(frozen=True)
class CheckpointCounters:
    """Recurrent-state checkpoints of a hybrid model (all 0 when it stores none)."""

    stored: int = 0
    hits: int = 0
    misses: int = 0
    evicted: int = 0
    bytes: int = 0
    resumed_tokens: int = 0  # prompt tokens skipped by resuming from checkpoints
    budget_bytes: int = 0  # the store's bound (0: no store)


@dataclass(frozen=True)
class PlacementInfo:
    """The checkpoint placement policy of a hybrid model: its spec and the depths it places now."""

    policy: str  # the --checkpoint-policy spec, e.g. "optimal:4"
    depths: tuple[int, ...] | None  # blocks, for every prompt; None for rules that depend on the prompt length
    block_size: int
    changes: int  # how often a learned placement changed
    num_observed: int = 0  # overlap depths the policy has learned from


@dataclass(frozen=True)
class SpecDecodeCounters:
    """Speculative decoding: draft tokens verified and accepted since start."""

    method: str  # ngram | suffix
    k: int  # most drafts per step
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()  # entry j: steps that accepted draft j (0-based)


@dataclass(frozen=True)
class EngineStats:
    """Everything the engine counts, at one instant."""

    prompt_tokens: int = 0  # of accepted requests
    generation_tokens: int = 0
    num_steps: int = 0
    num_failed_requests: int = 0
    num_failed_batches: int = 0  # steps whose batch raised and was retried one request at a time
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # prompt tokens found there
    num_preemptions: int = 0
    num_evictions: int = 0  # cached blocks evicted from the pool
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by requests
    num_used_blocks: int = 0
    num_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_queued_tokens: int = 0  # prompt tokens of waiting and running requests not computed yet (a router's load)
    tiers: dict[str, TierCounters] = field(default_factory=dict)  # KV tiers below the pool, by name
    host_tier_bytes: int = 0
    checkpoints: CheckpointCounters | None = None  # hybrid models only
    placement: PlacementInfo | None = None  # hybrid models: where prefill snapshots the recurrent state
    spec_decode: SpecDecodeCounters | None = None  # with --speculative only
