"""The router's counters, in the ingress process (where Ray Serve runs the deployment handle's router)."""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

ROUTERS: weakref.WeakSet[Any] = weakref.WeakSet()  # the fleet routers Serve built in this process


def release_claims(request_id: str) -> None:
    """A request the ingress sent was refused or lost before a replica accepted it: every router here drops
    the blocks it claimed for it (they were never stored)."""
    for router in list(ROUTERS):
        router.release(request_id)


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
