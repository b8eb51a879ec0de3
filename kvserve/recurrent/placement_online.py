"""optimal:M: the exact placement (placement_cost.py) learned online from the overlap depths requests show.

optimal:M keeps a histogram over block depths 0..max_depth_blocks (deeper depths count as max_depth_blocks)
with exponential decay: each observation first multiplies all earlier weight by `decay`. It is O(1) per
observation (the increment grows by 1/decay instead, and the histogram is rescaled now and then). The
placement is re-solved after observations 1, 2, 4, 8, ... while that is below `resolve_every` (so a cold
engine learns fast), then every `resolve_every` observations. A new solution is adopted only if it lowers J
under the current histogram by more than `switch_margin` (make_placement_policy's default 2%; the class
itself defaults to 0, always): each change moves where new snapshots go (the old ones stay until the store
evicts them), so chasing noise writes snapshots few requests use. A re-solve that keeps the placement still
refreshes the per-length answers below. And while every depth seen so far fits the budget, a newly seen
depth is placed at once (the whole support is then the exact optimum), so a new document is checkpointed
from its second request on.

Per prompt length. A request of n blocks can only snapshot at depths <= n, and its snapshots serve later
requests that share its first d blocks, d <= n. So it takes the M depths that minimise J over the depths
<= n: the same DP on the histogram cut at n (the DP's answer for a prefix of the depth axis, as the
paper's reference code backtracks it from the sequence's length), not the global placement cut at n,
which would leave a short prompt fewer than M. `placed` is the placement of the longest prompts (the C whose
J the benchmarks compare). One DP table answers every length in O(K + M) (`_dp_tables`); answers are
cached per length until the next re-solve. Measured (bench/sparse_prefix.py, 2,000 requests, seed 0):
recomputed tokens per request at M = 1, 4, 8 went from 2,236 / 561 / 216 (the global placement) to
838 / 244 / 34 on document-qa and from 731 / 228 / 110 to 411 / 84 / 22 on system-prompts; the global
placement lost to balanced:M at M = 1 on both.

Spare budget. When the exact optimum for a prompt of n blocks needs fewer than M depths (every observed
depth <= n already has a checkpoint, J = 0 under the histogram), the spare ones go on a grid: every G
blocks up to n, G the smallest power of two with n // G <= M - |optimum|. They cost nothing the histogram
can see, and they serve the depths it has not seen yet: a document's first repeat (its depth is new)
resumes from the grid point below instead of from nothing. Powers of two nest, so prompts of different
lengths share most grid points. (`placed` shows the grid up to the deepest depth seen.) Measured on
document-qa at M = 218 (the per-prompt count every-block:4 needs), before the grid: 20.2 recomputed tokens
per request against every-block:4's 12.1, all of it on first repeats.

Snapshots are not dropped when the placement changes: prompts of different lengths take different depths,
so a store holding several per sequence is expected, and the store's byte budget evicts (LRU) what is not
used.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from kvserve.recurrent.placement_cost import _dp_tables, _pick, _support, _weights, expected_recompute
from kvserve.recurrent.placement_rules import PlacementPolicy, _check_num_blocks

__all__ = ["DepthHistogram", "OptimalPlacement"]


class DepthHistogram:
    """Exponentially decayed counts of overlap depths 0..max_depth; O(1) per observation."""

    _RESCALE_AT = 1e200

    def __init__(self, max_depth: int, decay: float = 0.99):
        if max_depth < 1:
            raise ValueError(f"max_depth_blocks must be >= 1, got {max_depth}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.max_depth = max_depth
        self.decay = decay
        self.num_observed = 0
        self.seen: set[int] = set()  # distinct depths >= 1 ever observed (clipped)
        self._counts = np.zeros(max_depth + 1, dtype=np.float64)
        self._increment = 1.0  # weight of the next observation; older weight stays put, which is the same decay

    def observe(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"overlap depth must be >= 0, got {depth}")
        if self.num_observed:
            self._increment /= self.decay
        depth = min(depth, self.max_depth)
        if depth:
            self.seen.add(depth)
        self._counts[depth] += self._increment
        self.num_observed += 1
        if self._increment > self._RESCALE_AT:
            self._counts /= self._increment
            self._increment = 1.0

    def probs(self) -> np.ndarray:
        """The decayed distribution over depths 0..max_depth (all zeros before the first observation)."""
        total = self._counts.sum()
        return self._counts / total if total > 0 else self._counts.copy()


class _Solution:
    """The exact DP of one histogram, once: the placement for the support cut at any prompt length in O(K + M)
    (`_dp_tables`), so per-length answers cost no new DP."""

    def __init__(self, probs: np.ndarray, budget: int, deepest: int):
        self.probs, self.budget, self.deepest = probs, budget, deepest
        support = _support(probs)
        self.support = support.tolist()
        self.before = np.cumsum(probs)[support - 1].tolist() if len(support) else []
        self.tables = _dp_tables(self.support, self.before, budget) if len(support) > budget else None

    def depths(self, num_blocks: int, top: int) -> list[int]:
        """optimal_checkpoints(probs[: num_blocks + 1], budget), plus the spare budget's grid up to `top`
        (module docstring: Per prompt length, Spare budget)."""
        k = bisect.bisect_right(self.support, num_blocks)
        if k <= self.budget:
            depths = self.support[:k]
        else:
            assert self.tables is not None
            total = float(self.probs[: num_blocks + 1].sum())  # as optimal_checkpoints sums the cut weights
            depths = [self.support[i] for i in _pick(self.support, self.before, total, self.budget, k, *self.tables)]
        spare = self.budget - len(depths)
        if spare <= 0 or top < 1:
            return depths
        grid = 1
        while top // grid > spare:
            grid *= 2
        return sorted(set(depths).union(range(grid, top + 1, grid)))


class OptimalPlacement(PlacementPolicy):
    """optimal:M: the exact DP on a decayed histogram of observed overlap depths, per prompt length."""

    name = "optimal"

    def __init__(
        self,
        budget: int,
        *,
        max_depth_blocks: int = 4096,
        resolve_every: int = 32,
        decay: float = 0.99,
        switch_margin: float = 0.0,
    ):
        if not 0.0 <= switch_margin < 1.0:
            raise ValueError(f"switch_margin must be in [0, 1), got {switch_margin}")
        if budget < 1:
            raise ValueError(f"{self.name}:M needs M >= 1 checkpoints, got {budget}")
        if resolve_every < 1:
            raise ValueError(f"resolve_every must be >= 1, got {resolve_every}")
        self.switch_margin = switch_margin
        self.budget = budget
        self.resolve_every = resolve_every
        self.histogram = DepthHistogram(max_depth_blocks, decay)
        self.depths: list[int] = []
        self.num_solves = 0
        self._solution: _Solution | None = None  # the DP of the histogram the current placement was solved on
        self._per_length: dict[int, list[int]] = {}  # prompt blocks -> depths, for the current placement
        self._learning = True  # False for OptimalPlacement.fixed

    @classmethod
    def fixed(cls, probs: Sequence[float] | np.ndarray, budget: int) -> OptimalPlacement:
        """optimal:M solved once on a known distribution (probs[t] for depths 0..N) that never learns: the
        offline optimum benchmarks compare the online policy with, with the same per-length answers and grid."""
        w = _weights(probs)
        policy = cls(budget, max_depth_blocks=max(len(w) - 1, 1))
        policy.histogram.seen.update(int(t) for t in _support(w))
        policy._adopt(_Solution(w, budget, max(policy.histogram.seen, default=0)))
        policy._learning = False
        return policy

    def due(self, n: int) -> bool:
        """Re-solve after observation n? (1, 2, 4, ... below resolve_every, then every resolve_every.)"""
        if n < self.resolve_every:
            return n & (n - 1) == 0
        return n % self.resolve_every == 0

    def observe(self, depth: int) -> None:
        if not self._learning:
            super().observe(depth)  # still rejects a negative depth
            return
        depth = min(depth, self.histogram.max_depth)
        new = depth >= 1 and depth not in self.histogram.seen
        self.histogram.observe(depth)
        if self.due(self.histogram.num_observed):
            self.resolve()
        elif new and len(self.histogram.seen) <= self.budget:
            # Every depth seen so far fits the budget: the whole support is the optimum, no need to wait.
            self._adopt(_Solution(self.histogram.probs(), self.budget, max(self.histogram.seen)))

    def resolve(self) -> None:
        probs = self.histogram.probs()
        self.num_solves += 1
        solution = _Solution(probs, self.budget, max(self.histogram.seen, default=0))
        depths = solution.depths(self.histogram.max_depth, solution.deepest)
        if depths != self.depths and self.depths and self.switch_margin > 0:
            # Switch only for a real gain (module docstring). The same placement is adopted quietly below, so
            # shorter prompts' answers still refresh.
            if expected_recompute(probs, depths) > (1 - self.switch_margin) * expected_recompute(probs, self.depths):
                return
        self._adopt(solution, depths)

    def _adopt(self, solution: _Solution, depths: list[int] | None = None) -> None:
        self._solution, self._per_length = solution, {}
        if depths is None:
            depths = solution.depths(self.histogram.max_depth, solution.deepest)
        if depths != self.depths:
            self.depths = depths
            self.version += 1

    @property
    def placed(self) -> list[int]:
        return list(self.depths)

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        if self._solution is None:
            return []
        n = min(num_blocks, self.histogram.max_depth)
        depths = self._per_length.get(n)
        if depths is None:
            depths = self._per_length[n] = self._solution.depths(n, n)
        return list(depths)

    def describe(self) -> str:
        return f"{self.spec} {self.depths}"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.budget}"
