"""The fleet's metrics from its replicas': summed engine stats, and each replica's exposition labelled.

sum_stats: the replicas' EngineStats added up (counters and gauges that add: tokens, hits, blocks, requests),
so the ingress's unlabelled `kvserve:` series describe the whole fleet (its prefix-cache hit rate is
sum(hits) / sum(queries)); KV usage is the used share of all the fleet's blocks.
merge_expositions: the ingress's own series, then every replica's with a `replica="..."` label, each metric
family once.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kvserve.stats import EngineStats

_ADDITIVE = tuple(f.name for f in dataclasses.fields(EngineStats) if f.type in ("int", int) and f.name != "num_blocks")


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    if not stats:
        return EngineStats()
    total = {name: sum(getattr(s, name) for s in stats) for name in _ADDITIVE}
    blocks = sum(s.num_blocks for s in stats)
    usage = sum(s.kv_cache_usage * s.num_blocks for s in stats) / blocks if blocks else 0.0
    return EngineStats(**total, num_blocks=blocks, kv_cache_usage=usage)


def merge_expositions(own: list[bytes], labelled: dict[str, bytes], label: str) -> bytes:
    """One valid exposition from several: `own` as they are, each of `labelled`'s samples with label=<key>.
    Samples of one metric family end up in one block under one HELP/TYPE (Prometheus rejects a family
    described twice)."""
    families: dict[str, Metric] = {}

    def add(text: bytes, extra: dict[str, str]) -> None:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**extra, **sample.labels}))

    for text in own:
        add(text, {})
    for name in sorted(labelled):
        add(labelled[name], {label: name})

    class _Merged:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
