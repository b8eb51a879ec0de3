"""The router's counters, in the ingress process (where Ray Serve runs the deployment handle's router)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.decisions = Counter(
            "kvserve:router_decisions", "Routing decisions by policy and reason.", ["policy", "reason"], registry=r
        )
        self.matched = Counter(
            "kvserve:router_matched_tokens", "Prompt tokens routed to a replica that held them.", registry=r
        )
        self.index_blocks = Gauge("kvserve:router_index_blocks", "Distinct KV blocks in the router index.", registry=r)


ROUTER_METRICS = RouterMetrics()
