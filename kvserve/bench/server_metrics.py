"""What the server's own /metrics says about a run: scraped before and after it, reported as differences.

Best effort: a server without /metrics (llama.cpp's server, most proxies), or one whose /metrics is not
Prometheus text, gives None and the run goes on. From kvserve's metrics (README, "Metrics") we take, when
present:

  checkpoints   deltas of kvserve:recurrent_checkpoint{s_stored,_hits,_misses,s_evicted}_total and
                kvserve:recurrent_resumed_tokens_total, and kvserve:recurrent_checkpoint_bytes after the run;
  recomputed    kvserve:recomputed_prompt_tokens: count, sum and mean of the run's observations, and p50 / p99
                estimated from the bucket deltas as Prometheus' histogram_quantile() does (linear within the
                bucket; the highest finite bound when the rank falls in +Inf);
  placement     kvserve:recurrent_checkpoint_placement_info after the run (policy, depths, block size) and
                how often it changed during the run;
  spec_decode   deltas of kvserve:spec_decode_{draft,accepted}_tokens_total and the acceptance rate.

Differences assume the counters were not reset in between (a restarted server gives nonsense, as it would
to any rate()).
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CHECKPOINT_COUNTERS = {
    "stored": "kvserve:recurrent_checkpoints_stored_total",
    "hits": "kvserve:recurrent_checkpoint_hits_total",
    "misses": "kvserve:recurrent_checkpoint_misses_total",
    "evicted": "kvserve:recurrent_checkpoints_evicted_total",
    "resumed_tokens": "kvserve:recurrent_resumed_tokens_total",
}
CHECKPOINT_BYTES = "kvserve:recurrent_checkpoint_bytes"
RECOMPUTED = "kvserve:recomputed_prompt_tokens"
PLACEMENT_INFO = "kvserve:recurrent_checkpoint_placement_info"
PLACEMENT_CHANGES = "kvserve:recurrent_checkpoint_placement_changes_total"
SPEC_DRAFTS = "kvserve:spec_decode_draft_tokens_total"
SPEC_ACCEPTED = "kvserve:spec_decode_accepted_tokens_total"


def metrics_url(base_url: str) -> str:
    """/metrics at the server root (base_url may end in /v1)."""
    url = base_url.rstrip("/")
    return (url[: -len("/v1")] if url.endswith("/v1") else url) + "/metrics"


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


async def scrape(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> Samples | None:
    """The server's /metrics samples, or None when it has none (any HTTP error, non-200, or unparseable text)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:
            r = await client.get(metrics_url(base_url))
        if r.status_code != 200:
            return None
        return parse(r.text)
    except Exception:  # noqa: BLE001 - best effort: no metrics is not a failed benchmark
        return None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0..1) from cumulative (upper bound, count) buckets, as Prometheus estimates it.

    Linear interpolation inside the bucket the rank q * total falls in (the lowest bucket starts at 0, or at
    its bound when that is <= 0); a rank in the +Inf bucket gives the highest finite bound. None if empty.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(bound):
                return buckets[i - 1][0] if i > 0 else None
            if i == 0 and bound <= 0:
                return bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return buckets[-1][0]


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def summarize_server(before: Samples | None, after: Samples | None) -> dict[str, Any] | None:
    """checkpoints / recomputed_prompt_tokens / placement over the run (each None when the server lacks it);
    None when either scrape failed."""
    if before is None or after is None:
        return None

    def delta(name: str, **labels: str) -> float | None:
        end = _get(after, name, **labels)
        return None if end is None else end - (_get(before, name, **labels) or 0.0)

    checkpoints = None
    if all(_get(after, name) is not None for name in CHECKPOINT_COUNTERS.values()):
        checkpoints = {key: int(delta(name) or 0) for key, name in CHECKPOINT_COUNTERS.items()}
        held = _get(after, CHECKPOINT_BYTES)
        checkpoints["bytes_held"] = None if held is None else int(held)

    recomputed = None
    count = delta(RECOMPUTED + "_count")
    total = delta(RECOMPUTED + "_sum")
    if count is not None and total is not None:
        buckets = []
        for (name, labels), _ in after.items():
            if name == RECOMPUTED + "_bucket":
                le = dict(labels)["le"]
                buckets.append((float(le), delta(name, le=le) or 0.0))
        recomputed = {
            "count": int(count),
            "sum": int(total),
            "mean": total / count if count else None,
            "p50": histogram_quantile(0.5, buckets),
            "p99": histogram_quantile(0.99, buckets),
        }

    placement = None
    infos = [dict(labels) for (name, labels), v in after.items() if name == PLACEMENT_INFO and v == 1]
    if infos:
        info = infos[0]
        depths = info.get("depths", "")
        placement = {
            "policy": info.get("policy"),
            "depths": [int(d) for d in depths.split(",")] if depths else None,
            "block_size": int(info["block_size"]) if info.get("block_size") else None,
            "changes": int(delta(PLACEMENT_CHANGES) or 0),
        }
    spec = None
    drafts, accepted = delta(SPEC_DRAFTS), delta(SPEC_ACCEPTED)
    if drafts is not None and accepted is not None:
        spec = {
            "draft_tokens": int(drafts),
            "accepted_tokens": int(accepted),
            "acceptance_rate": accepted / drafts if drafts else None,
        }
    return {
        "checkpoints": checkpoints,
        "recomputed_prompt_tokens": recomputed,
        "placement": placement,
        "spec_decode": spec,
    }
