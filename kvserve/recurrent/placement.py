"""Where to snapshot a recurrent state: the checkpoint depths that minimise expected recomputation.

A recurrent (Mamba-style) layer keeps one fixed-size state per sequence, so a new request can resume only
from a depth where that exact state was stored. Attention KV is cached at every block, recurrent state only
at a few checkpoints; a request whose cached prefix ends at depth t resumes from the deepest checkpoint at or
below t and recomputes the rest. With p(t) the probability that a request's overlap ends at depth t
(t = 0..N blocks) and a set C of checkpoint depths, the expected number of recomputed blocks is

    J(C) = sum_t p(t) * (t - prev_C(t)),   prev_C(t) = max{c in C : c <= t}, or 0 when there is none.

Weights need not sum to one: `expected_recompute` normalises them (J is an expectation), the all-zero
distribution has J = 0, and negative, NaN or infinite weights are a ValueError.

The exact optimum (`optimal_checkpoints`) in O(N*M) for M checkpoints (Shirokikh & Nikolenko 2026):

* Only depths with p > 0 (and > 0 itself; depth 0 is free) are worth a checkpoint: a checkpoint at c with
  p(c) = 0 can move up to c + 1 without losing anything, until it meets a depth with p > 0 or the next
  checkpoint. So the DP runs over the K support depths s_1 < ... < s_K. If M >= K, C = support gives J = 0
  and is the smallest such set (every support depth needs its own checkpoint), so we return it.
* Minimising J is maximising the savings S(C) = sum_t p(t) prev_C(t). With F_i = sum_{t < s_i} p(t), the
  total W, and the chosen depths c_1 < ... < c_k (c_{k+1} standing for "past the end", F = W):
  S = sum_a c_a * (F(c_{a+1}) - F(c_a)): every request in [c_a, c_{a+1}) resumes from c_a.
* Recurrence, D_j(i) = best savings of j checkpoints with the j-th at s_i, counting the terms of the first
  j - 1 (each term needs its successor):
      D_1(i) = 0,   D_j(i) = max_{l < i} D_{j-1}(l) + s_l * F_i - s_l * F_l,
      answer     = max_i D_M(i) + s_i * (W - F_i).
  Using exactly M < K checkpoints is optimal: adding any unused support depth strictly lowers J.
* Monotone convex-hull trick: for fixed i the candidates are lines y_l(x) = s_l * x + (D_{j-1}(l) - s_l F_l)
  evaluated at x = F_i. Lines enter in strictly increasing slope (s_l grows with l) and queries come in
  strictly increasing x (F_{i+1} = F_i + p(s_i) > F_i), and line l may serve query i only when l < i, which
  is exactly the order in which they are inserted. Keep the upper envelope in a deque: a new line makes the
  last one useless when the new line overtakes the one before it no later than the last one does (then the
  last one is never strictly on top); and since x only grows and later lines are steeper, once line k+1 is
  at least as high as line k at x it stays so for every larger x, so the front of the deque can be dropped
  for good. Every line enters and leaves once: O(K) per layer, O(K*M) <= O(N*M) in all, plus O(K*M) memory
  for the argmax table to read the placement back.

Placement policies (`make_placement_policy(spec)`, the `--checkpoint-policy` flag) decide the depths a
request snapshots at. Depths are in blocks throughout (the store is keyed by block hashes, so a checkpoint
can only sit on a block boundary):

    none            no checkpoints (every hit recomputes its whole prefix)
    every-block:B   every B blocks (B * block_size tokens): B, 2B, ...
    sqrt            every ceil(sqrt(n)) blocks for an n-block prompt, so about sqrt(n) checkpoints
    log             geometric: depths 1, 2, 4, 8, ... (doubling) up to n
    balanced:M      M checkpoints evenly spaced over each prompt: every n // (M + 1) blocks of an n-block
                    prompt (the paper's fixed-count baseline)
    optimal:M       the exact DP above on the learned distribution, per prompt length (below)

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
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "BalancedSpacing",
    "DepthHistogram",
    "EveryBlock",
    "LogSpacing",
    "NoCheckpoints",
    "OptimalPlacement",
    "PlacementPolicy",
    "SqrtSpacing",
    "expected_recompute",
    "make_placement_policy",
    "optimal_checkpoints",
]


# --------------------------------------------------------------------------------------- plain functions
def _weights(probs: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(probs, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"probs must be one-dimensional (probs[t] for depth t), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("probs contains NaN or infinite weights")
    if np.any(w < 0):
        raise ValueError("probs contains negative weights")
    with np.errstate(over="ignore"):
        overflows = len(w) and not math.isfinite(float(w.sum()))
    if overflows:  # finite weights whose sum overflows: J and the placement are scale-free
        w = w / w.max()
    return w


def _support(w: np.ndarray) -> np.ndarray:
    """Depths >= 1 with positive weight: the only depths where a checkpoint can save anything."""
    return np.flatnonzero(w[1:] > 0) + 1


def expected_recompute(probs: Sequence[float] | np.ndarray, checkpoints: Iterable[int]) -> float:
    """J(C): expected blocks recomputed, sum_t p(t) (t - prev_C(t)) / sum_t p(t); 0.0 for all-zero weights.

    checkpoints may come in any order and repeat; depth 0 is allowed (it is free). A depth outside 0..N is a
    ValueError.
    """
    w = _weights(probs)
    n = len(w) - 1
    marks = np.zeros(len(w), dtype=bool)
    for c in checkpoints:
        c = int(c)
        if c == 0:
            continue  # always allowed, and free: prev_C(t) >= 0 anyway
        if not 0 <= c <= n:
            raise ValueError(f"checkpoint depth {c} outside 0..{n}")
        marks[c] = True
    total = float(w.sum())
    if total == 0.0:
        return 0.0
    depth = np.arange(len(w))
    prev = np.maximum.accumulate(np.where(marks, depth, 0))
    return float(np.dot(w, depth - prev) / total)


def optimal_checkpoints(probs: Sequence[float] | np.ndarray, budget: int) -> list[int]:
    """The sorted checkpoint depths (at most `budget`, each in 1..N, no duplicates) minimising J.

    probs[t] is the (unnormalised, nonnegative) weight of overlap depth t = 0..N. With budget >= the number
    of depths t >= 1 of positive weight, that whole support is returned (J = 0). O(N * budget) time.
    """
    w = _weights(probs)
    integral = isinstance(budget, numbers.Real) and not isinstance(budget, bool) and float(budget).is_integer()
    if not integral or budget < 0:
        raise ValueError(f"budget must be a nonnegative integer, got {budget!r}")
    budget = int(budget)
    support = _support(w)
    k = len(support)
    if budget == 0 or k == 0:
        return []
    if budget >= k:
        return support.tolist()
    before = np.cumsum(w)[support - 1]  # F_i: weight of the depths below s_i
    picks = _solve_dp(support.tolist(), before.tolist(), float(w.sum()), budget)
    return [int(support[i]) for i in picks]


def _solve_dp(s: list[int], f: list[float], total: float, m: int) -> list[int]:
    """Indices into s of the best m < len(s) checkpoints (recurrence and hull trick in the module docstring)."""
    return _pick(s, f, total, m, len(s), *_dp_tables(s, f, m))


def _dp_tables(s: list[int], f: list[float], m: int) -> tuple[list[float], list[list[int]]]:
    """D_m(i) for every support index i, and the argmax tables to read a placement back.

    D_j(i) counts only the terms of the first j - 1 checkpoints, so it does not depend on where the depth axis
    ends: the same tables answer the placement for the support cut at any length (`_pick` with k < len(s)),
    exactly as a DP run on the cut support would (each value is built from lines l < i only)."""
    k = len(s)
    d = [0.0] * k  # D_1
    argmax: list[list[int]] = []  # argmax[j - 2][i]: the predecessor of the j-th checkpoint at s_i
    for j in range(2, m + 1):
        lo, hi = j - 1, k - (m - j)  # the j-th checkpoint leaves room for j - 1 before and m - j after
        new_d = [0.0] * k
        arg = [0] * k
        hull_m: list[float] = []  # slopes
        hull_b: list[float] = []  # intercepts
        hull_l: list[int] = []  # line ids
        head = 0
        for i in range(lo, hi):
            # Insert the line of predecessor i - 1 (steeper than every line in the hull).
            line = i - 1
            m3 = s[line]
            b3 = d[line] - m3 * f[line]
            while len(hull_m) - head >= 2:
                m1, b1, m2, b2 = hull_m[-2], hull_b[-2], hull_m[-1], hull_b[-1]
                # The last line is useless when the new one overtakes line 1 no later than it does.
                if (b1 - b2) * (m3 - m1) >= (b1 - b3) * (m2 - m1):
                    hull_m.pop()
                    hull_b.pop()
                    hull_l.pop()
                else:
                    break
            hull_m.append(m3)
            hull_b.append(b3)
            hull_l.append(line)
            # Query x = F_i: move the head right while the next line is at least as high.
            x = f[i]
            top = len(hull_m) - 1
            if head > top:
                head = top
            best = hull_m[head] * x + hull_b[head]
            while head < top:
                nxt = hull_m[head + 1] * x + hull_b[head + 1]
                if nxt < best:
                    break
                head += 1
                best = nxt
            new_d[i] = best
            arg[i] = hull_l[head]
        d = new_d
        argmax.append(arg)
    return d, argmax


def _pick(
    s: list[int], f: list[float], total: float, m: int, k: int, d: list[float], argmax: list[list[int]]
) -> list[int]:
    """The best m < k checkpoints among the first k support depths; total = the weight of depths up to the cut."""
    # The last checkpoint collects every depth from it to the end.
    best_i, best_v = -1, -math.inf
    for i in range(m - 1, k):
        v = d[i] + s[i] * (total - f[i])
        if v > best_v:
            best_i, best_v = i, v
    picks = [best_i]
    for arg in reversed(argmax):
        picks.append(arg[picks[-1]])
    picks.reverse()
    return picks


# ------------------------------------------------------------------------------------------- policies
class PlacementPolicy(ABC):
    """Which depths a prefilling request snapshots its recurrent state at, possibly learned online.

    `version` grows whenever a learned placement changes; `placed` is then its depths for the longest prompts
    (the set C that J(C) measures; None for rules without one).
    """

    version: int = 0

    @property
    def placed(self) -> list[int] | None:
        """The depths placed for the longest prompts (shorter ones may get others: see OptimalPlacement)."""
        return None

    @abstractmethod
    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        """Sorted depths in 1..num_blocks at which a request of num_blocks full prompt blocks snapshots."""

    def observe(self, depth: int) -> None:
        """A request diverged from the cached prefix at this depth (blocks)."""
        if depth < 0:
            raise ValueError(f"overlap depth must be >= 0, got {depth}")

    @abstractmethod
    def describe(self) -> str:
        """The spec and, for learned policies, the current depths, e.g. 'optimal:4 [3, 17, 40, 128]'."""

    @property
    def spec(self) -> str:
        """The --checkpoint-policy spec this policy was made from, e.g. 'every-block:8' or 'optimal:4'."""
        return self.describe()


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")


class NoCheckpoints(PlacementPolicy):
    @property
    def placed(self) -> list[int]:
        return []

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        return []

    def describe(self) -> str:
        return "none"


class EveryBlock(PlacementPolicy):
    """A checkpoint every `interval` blocks: interval, 2 * interval, ..."""

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"every-block interval must be >= 1 block, got {interval}")
        self.interval = interval

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        return list(range(self.interval, num_blocks + 1, self.interval))

    def describe(self) -> str:
        return f"every-block:{self.interval}"


class SqrtSpacing(PlacementPolicy):
    """A checkpoint every ceil(sqrt(n)) blocks of an n-block prompt: about sqrt(n) checkpoints."""

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        if num_blocks == 0:
            return []
        step = math.isqrt(num_blocks - 1) + 1  # ceil(sqrt(n))
        return list(range(step, num_blocks + 1, step))

    def describe(self) -> str:
        return "sqrt"


class LogSpacing(PlacementPolicy):
    """Geometric depths 1, 2, 4, 8, ... up to the prompt: dense near the root, sparse deep down."""

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        out, d = [], 1
        while d <= num_blocks:
            out.append(d)
            d *= 2
        return out

    def describe(self) -> str:
        return "log"


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


class BalancedSpacing(PlacementPolicy):
    """M checkpoints evenly spaced over each prompt: every n // (M + 1) blocks of an n-block prompt, M of them."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"balanced:M needs M >= 1 checkpoints, got {budget}")
        self.budget = budget

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        step = max(1, num_blocks // (self.budget + 1))
        return list(range(step, min(step * self.budget, num_blocks) + 1, step))  # O(min(M, n)), any M

    def describe(self) -> str:
        return f"balanced:{self.budget}"


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


SPECS = ("none", "every-block:B", "sqrt", "log", "balanced:M", "optimal:M")


def _int_arg(spec: str, arg: str, what: str) -> int:
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"checkpoint policy {spec!r}: {what} must be an integer, got {arg!r}") from None
    if value < 1:
        raise ValueError(f"checkpoint policy {spec!r}: {what} must be >= 1, got {value}")
    return value


def make_placement_policy(
    spec: str,
    *,
    max_depth_blocks: int = 4096,
    resolve_every: int = 32,
    decay: float = 0.999,  # bench/sparse_prefix.py sweeps: 0.99 recomputes 6-14% less (summed over M) but misses
    # the 200-request J target at more budgets and changes placement 2-3x as often
    switch_margin: float = 0.02,  # adopt a new placement only if J improves by > 2%
) -> PlacementPolicy:
    """The policy a --checkpoint-policy spec names; one of none, every-block:B, sqrt, log, balanced:M, optimal:M."""
    name, sep, arg = spec.strip().lower().partition(":")
    if name in ("none", "sqrt", "log"):
        if sep:
            raise ValueError(f"checkpoint policy {spec!r}: {name} takes no argument")
        return {"none": NoCheckpoints, "sqrt": SqrtSpacing, "log": LogSpacing}[name]()
    if name == "every-block":
        if not sep:
            raise ValueError(f"checkpoint policy {spec!r}: write every-block:B with B the interval in blocks")
        return EveryBlock(_int_arg(spec, arg, "the interval B (blocks)"))
    if name in ("balanced", "optimal"):
        if not sep:
            raise ValueError(f"checkpoint policy {spec!r}: write {name}:M with M the number of checkpoints")
        if name == "balanced":
            return BalancedSpacing(_int_arg(spec, arg, "the budget M"))
        return OptimalPlacement(
            _int_arg(spec, arg, "the budget M"),
            max_depth_blocks=max_depth_blocks,
            resolve_every=resolve_every,
            decay=decay,
            switch_margin=switch_margin,
        )
    raise ValueError(f"unknown checkpoint policy {spec!r}; choose one of {', '.join(SPECS)}")
