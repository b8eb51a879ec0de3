"""RecurrentCacheManager: what prefix caching means for a model with recurrent layers.

Attention KV can be reused from any block boundary, recurrent state only from a checkpoint. So:
  * admission (`limit_prefix_hit`): a request whose KV prefix hit covers t blocks resumes from the deepest
    checkpoint s <= t in the CheckpointStore; its KV hit is cut to s blocks and its slot will be loaded from
    the snapshot. No checkpoint -> no hit at all (prefill from 0; the KV blocks are recomputed).
  * scheduling (`cut_chunk`): prefill chunks end exactly at the request's checkpoint positions (chosen by the
    PlacementPolicy when it is first scheduled), so the state after the chunk is the state to snapshot.
  * running (`prepare`, `commit`): before a step the request's slot must hold its state at the step's
    start (zeros at 0, the snapshot at a resume point); after a successful step the new states are
    written and, at checkpoint positions, snapshotted into the store under block_hashes[depth - 1].
  * freeing (`free`): a finished, aborted or preempted request gives its slot back (a preempted request
    later restarts from 0 or from a checkpoint, possibly its own).
The policy also learns online: each new request's KV hit depth (its divergence from the cache) is observed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.kv.cache_manager import ComputedBlocks
from kvserve.recurrent.checkpoints import CheckpointStore
from kvserve.recurrent.placement import PlacementPolicy
from kvserve.recurrent.state_pool import RecurrentStatePool
from kvserve.request import Request


class RecurrentCacheManager:
    def __init__(
        self,
        pool: RecurrentStatePool,
        block_size: int,
        store: CheckpointStore | None = None,
        policy: PlacementPolicy | None = None,
    ):
        self.pool = pool
        self.block_size = block_size
        self.store = store  # None: prefix caching off, or no checkpoints wanted
        self.policy = policy
        self._positions: dict[str, list[int]] = {}  # request id -> checkpoint positions (tokens), ascending
        self._restore: dict[str, tuple[int, list[torch.Tensor]]] = {}  # request id -> (position, snapshot)
        self._observed: set[str] = set()
        self._looked_up: set[str] = set()  # requests whose last limit_prefix_hit looked in the store
        self.num_resumed_tokens = 0  # prompt tokens skipped thanks to checkpoints

    # ------------------------------------------------------------------------------------ scheduler side
    def limit_prefix_hit(self, request: Request, computed: ComputedBlocks) -> ComputedBlocks:
        """Cut a KV prefix hit to the deepest checkpoint at or below it (to nothing without one)."""
        rid = request.request_id
        hit = computed.num_tokens // self.block_size  # pool blocks, then blocks loaded from lower KV tiers
        if self.policy is not None and rid not in self._observed:
            self._observed.add(rid)
            if not request.needs_prompt_logprobs:  # one scoring its prompt did not look up: 0 is no overlap depth
                self.policy.observe(hit)
        self._restore.pop(rid, None)
        self._looked_up.discard(rid)
        if hit == 0 or self.store is None:
            return ComputedBlocks()
        # Counted when the request is admitted (`admitted`): a request waiting for memory looks up every step.
        found = self.store.lookup_deepest(request.block_hashes, hit, count=False)
        self._looked_up.add(rid)
        if found is None:
            return ComputedBlocks()
        depth, state = found
        tokens = depth * self.block_size
        self._restore[rid] = (tokens, state)
        shared = computed.blocks[:depth]
        return ComputedBlocks(shared, tokens, computed.loads[: depth - len(shared)])

    def admitted(self, request: Request) -> None:
        """The request whose prefix hit was just limited got its KV blocks: count its checkpoint hit or miss."""
        rid = request.request_id
        if self.store is not None and rid in self._looked_up:
            self._looked_up.discard(rid)
            if rid in self._restore:
                self.store.num_hits += 1
            else:
                self.store.num_misses += 1

    def cut_chunk(self, request: Request, start: int, num_tokens: int) -> int:
        """Shorten a chunk [start, start + num_tokens) so that it ends at the first checkpoint inside it."""
        for p in self._checkpoint_positions(request):
            if start < p < start + num_tokens:
                return p - start
        return num_tokens

    def _checkpoint_positions(self, request: Request) -> list[int]:
        positions = self._positions.get(request.request_id)
        if positions is None:
            positions = []
            if self.store is not None and self.policy is not None:
                depths = self.policy.checkpoint_depths(request.num_prompt_tokens // self.block_size)
                positions = sorted({d * self.block_size for d in depths if d >= 1})
            self._positions[request.request_id] = positions
        return positions

    def free(self, request: Request) -> None:
        """The request left the running set (finished, aborted or preempted): give its slot back."""
        self.pool.free(request.request_id)
        self._restore.pop(request.request_id, None)
        self._looked_up.discard(request.request_id)
        if request.is_finished:
            self._positions.pop(request.request_id, None)
            self._observed.discard(request.request_id)

    # --------------------------------------------------------------------------------------- runner side
    def prepare(self, request: Request, start: int) -> int:
        """The request's slot, holding its state after `start` tokens (zeroed or loaded if needed)."""
        rid = request.request_id
        if self.pool.slot(rid) is not None and self.pool.position(rid) == start:
            return self.pool.acquire(rid)
        if start == 0:
            return self.pool.reset(rid)
        restore = self._restore.get(rid)
        if restore is None or restore[0] != start:
            raise RuntimeError(
                f"request {rid}: recurrent state is at {self.pool.position(rid)} tokens but the step starts at "
                f"{start}, and no checkpoint was restored there"
            )
        return self.pool.load(rid, start, restore[1])

    def commit(self, requests: Sequence[Request], ends: Sequence[int], conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """The step ran: store the states after it and snapshot those that sit at a checkpoint position."""
        self.pool.commit([r.request_id for r in requests], ends, conv, ssm)
        for request, end in zip(requests, ends):
            restored = self._restore.pop(request.request_id, None)
            if restored is not None:
                self.num_resumed_tokens += restored[0]
            if self.store is None or end not in self._checkpoint_positions(request):
                continue
            depth = end // self.block_size
            if depth <= len(request.block_hashes):
                self.store.put(request.block_hashes[depth - 1], depth, self.pool.snapshot(request.request_id))
