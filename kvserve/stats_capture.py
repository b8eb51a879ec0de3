"""Taking an EngineStats snapshot from the engine's parts (on the engine's thread)."""

from __future__ import annotations

import dataclasses

from kvserve.builder import EngineParts
from kvserve.kv.tiers import TieredCache
from kvserve.recurrent.manager import RecurrentCacheManager
from kvserve.spec.speculator import Speculator
from kvserve.stats import CheckpointCounters, EngineStats, PlacementInfo, SpecDecodeCounters, TierCounters


def capture_stats(
    parts: EngineParts, tiers: TieredCache | None, counters: object, spec: Speculator | None = None
) -> EngineStats:
    """counters: the engine's own (prompt_tokens, generation_tokens, num_steps, num_failed_*)."""
    pool, kv, scheduler = parts.pool, parts.kv, parts.scheduler
    return EngineStats(
        **dataclasses.asdict(counters),  # type: ignore[call-overload]
        prefix_queries=kv.prefix_queries,
        prefix_hits=kv.prefix_hits,
        num_preemptions=scheduler.num_preemptions,
        num_evictions=pool.num_evictions,
        kv_cache_usage=pool.usage,
        num_used_blocks=pool.num_used_blocks,
        num_blocks=parts.num_blocks,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_queued_tokens=sum(r.num_tokens - r.num_computed_tokens for r in (*scheduler.running, *scheduler.waiting)),
        tiers=_tier_counters(tiers),
        host_tier_bytes=tiers.host.bytes_held if tiers is not None and tiers.host is not None else 0,
        checkpoints=_checkpoints(parts.recurrent),
        placement=_placement(parts.recurrent),
        spec_decode=None if spec is None else _spec(spec),
    )


def _spec(spec: Speculator) -> SpecDecodeCounters:
    c = spec.config
    return SpecDecodeCounters(c.method, c.k, spec.draft_tokens, spec.accepted_tokens, tuple(spec.accepted_per_position))


def _tier_counters(tiers: TieredCache | None) -> dict[str, TierCounters]:
    if tiers is None:
        return {}
    return {tier: dataclasses.replace(counters) for tier, counters in tiers.stats.items()}


def _checkpoints(recurrent: RecurrentCacheManager | None) -> CheckpointCounters | None:
    if recurrent is None:
        return None
    store = recurrent.store
    if store is None:  # a hybrid model without checkpoints (policy none, or prefix caching off): all zero
        return CheckpointCounters()
    return CheckpointCounters(
        stored=store.num_stored,
        hits=store.num_hits,
        misses=store.num_misses,
        evicted=store.num_evicted,
        bytes=store.bytes_held,
        resumed_tokens=recurrent.num_resumed_tokens,
        budget_bytes=store.budget_bytes,
    )


def _placement(recurrent: RecurrentCacheManager | None) -> PlacementInfo | None:
    policy = None if recurrent is None else recurrent.policy
    if policy is None:
        return None
    placed = policy.placed
    histogram = getattr(policy, "histogram", None)
    return PlacementInfo(
        policy=policy.spec,
        depths=None if placed is None else tuple(placed),
        block_size=recurrent.block_size,
        changes=policy.version,
        num_observed=histogram.num_observed if histogram is not None else 0,
    )
