"""Router: a routing policy over the fleet's block index, with the counters the ingress exports.

  route(request, loads)   -> Decision; the decision's blocks are claimed for the chosen replica at once
  apply(replica, batch)   KV events from a replica's engine (kvserve/kv/events.py)
  reported(replica, t)    a replica's load report counts every request sent to it before wall time t
  moved(request, d, r)    the request went to replica r instead of d.replica (the framework fell back)
  set_replicas(names)     the live replicas: everyone else's entries are forgotten

Load reports arrive every 50 ms or so; a burst routed in between would all see the same stale queue. So the
router adds to each replica's reported queued tokens the uncached tokens it sent there that the report does
not count yet (sent after the last moment the replica's engine took in its queue before that report).

No Ray here: kvserve/fleet/ray_router.py calls it from Ray Serve's RequestRouter, bench/routing.py from its
simulator, the unit tests directly.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence

from kvserve.kv.events import KVEventBatch, block_key
from kvserve.kv.hashing import hash_block_chain
from kvserve.router.index import BlockIndex
from kvserve.router.policies import Decision, ReplicaLoad, RouteRequest, RoutingPolicy, make_policy


def request_keys(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[int]:
    """The block keys of a prompt's full blocks, exactly as the engines compute them (salt included)."""
    extra = (cache_salt,) if cache_salt else ()
    return [block_key(h) for h in hash_block_chain(token_ids, block_size, extra)]


class Router:
    def __init__(self, policy: RoutingPolicy | str, block_size: int):
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.block_size = block_size
        self.index = BlockIndex()
        self.decisions: Counter[str] = Counter()  # reason -> count
        self.matched_tokens = 0  # prompt tokens routed to a replica that held them
        self.lost_batches = 0  # KV event batches found missing (the replica's entries were relearned)
        self.pending: dict[str, list[tuple[float, int]]] = {}  # replica -> (sent at, uncached tokens) not reported

    def request(self, token_ids: Sequence[int], cache_salt: str | None = None) -> RouteRequest:
        return RouteRequest(request_keys(token_ids, self.block_size, cache_salt), len(token_ids), self.block_size)

    def route(self, request: RouteRequest, loads: Sequence[ReplicaLoad]) -> Decision:
        if not loads:
            raise ValueError("no replica to route to")
        matches = self.index.match(request.block_keys)
        pending = {name: sum(n for _, n in sent) for name, sent in self.pending.items() if sent}
        if pending:
            loads = [
                ReplicaLoad(
                    r.replica, r.running, r.waiting, r.queued_tokens + pending[r.replica], r.kv_usage, r.in_flight
                )
                if r.replica in pending
                else r
                for r in loads
            ]
        decision = self.policy.choose(request, loads, matches)
        claimed = request.block_keys[matches.get(decision.replica, 0) :]  # the blocks it will store there
        self.index.add(decision.replica, claimed)
        uncached = request.num_tokens - decision.matched_tokens
        self.pending.setdefault(decision.replica, []).append((time.time(), uncached))
        self.decisions[decision.reason] += 1
        self.matched_tokens += decision.matched_tokens
        return decision

    def moved(self, request: RouteRequest, decision: Decision, replica: str) -> None:
        """The request was sent to `replica`, not to the decided one (Serve fell back to the next rank): move
        the claim and the pending tokens, so the index never keeps blocks a replica was never sent."""
        if replica == decision.replica:
            return
        claimed = request.block_keys[decision.matched_tokens // request.block_size :]
        self.index.remove(decision.replica, claimed)
        self.index.add(replica, request.block_keys)
        sent = self.pending.get(decision.replica)
        if sent:
            self.pending.setdefault(replica, []).append(sent.pop())

    def unclaim(self, request: RouteRequest, decision: Decision, replica: str) -> None:
        """The request never ran on `replica` (refused, or lost before it was accepted): drop the blocks it
        claimed there (what the replica held before stays)."""
        self.index.remove(replica, request.block_keys[decision.matched_tokens // request.block_size :])

    def reported(self, replica: str, covers: float | None = None) -> None:
        """A load report of `replica` counts what was sent before wall time `covers` (None: everything)."""
        sent = self.pending.get(replica)
        if sent:
            self.pending[replica] = [] if covers is None else [(t, n) for t, n in sent if t >= covers]

    def apply(self, replica: str, batch: KVEventBatch) -> None:
        if not self.index.apply(replica, batch):
            self.lost_batches += 1

    def set_replicas(self, replicas: Iterable[str]) -> None:
        live = set(replicas)
        for name in self.index.replicas:
            if name not in live:
                self.index.forget(name)
        for name in [n for n in self.pending if n not in live]:
            del self.pending[name]
