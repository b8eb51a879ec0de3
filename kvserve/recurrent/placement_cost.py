"""The cost of a checkpoint placement, J(C), and the exact placement minimising it (plain functions, no state).

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

The policies that use these live in placement_rules.py and placement_online.py; placement.py is the entry.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["expected_recompute", "optimal_checkpoints"]


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
