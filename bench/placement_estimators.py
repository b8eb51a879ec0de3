"""Issue 6's within-5% target is limited by the sample, not by the estimator: evidence over seeds.

    .venv/bin/python bench/placement_estimators.py [--seeds 10] [--warmup 200]

For each workload of bench/sparse_prefix.py and each seed, the true overlap-depth distribution p is the
histogram over the whole 2,000-request trace (as there). From the first --warmup requests' depths each
estimator builds a distribution q; the placement optimal_checkpoints(q, M) is scored by its expected
recompute under p, relative to the offline optimum J(p, optimal_checkpoints(p, M)). Estimators:

    empirical        the counts (what optimal:M's histogram holds after 200 requests; decay 0.999 ~ none)
    uniform+a        counts + a pseudo-requests spread evenly over depths 1..max seen (Dirichlet shrinkage)
    seen+a           counts + a pseudo-requests spread evenly over the depths seen
    sqrt             square roots of the counts (tempered: rarer depths count more)
    known-support    empirical counts + 1 on every depth of the true support: an oracle that knows which
                     depths exist but not how often (isolates the cost of depths not yet seen)

J is linear in p, so the Bayes decision under a Dirichlet posterior is the DP on its mean: the shrinkage
estimators are the Bayes-optimal learners for their priors. If none of them gets within 5%, no learner
that sees only those requests does much better on these traces.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sparse_prefix import BUDGETS, RESULTS, WORKLOADS  # noqa: E402  (bench/ is the script's directory)
from tqdm import tqdm

from kvserve.recurrent.placement import expected_recompute, optimal_checkpoints

MAX_DEPTH = 4096
Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (counts over depths, true p) -> weights


def _uniform(alpha: float) -> Estimator:
    def est(counts: np.ndarray, _p: np.ndarray) -> np.ndarray:
        top = int(np.nonzero(counts)[0].max())
        q = counts.copy()
        if top:
            q[1 : top + 1] += alpha / top
        return q

    return est


def _seen(alpha: float) -> Estimator:
    def est(counts: np.ndarray, _p: np.ndarray) -> np.ndarray:
        q = counts.copy()
        seen = np.nonzero(counts)[0]
        q[seen] += alpha / len(seen)
        return q

    return est


ESTIMATORS: dict[str, Estimator] = {
    "empirical": lambda c, _p: c,
    "uniform+5": _uniform(5),
    "uniform+20": _uniform(20),
    "seen+20": _seen(20),
    "seen+100": _seen(100),
    "sqrt": lambda c, _p: np.sqrt(c),
    "known-support": lambda c, p: c + (p > 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "placement_estimators.md"))
    args = ap.parse_args()
    lines = [
        "# Placement from the first requests vs the offline optimum",
        "",
        f"`bench/placement_estimators.py --seeds {args.seeds} --warmup {args.warmup}`: J under the true "
        f"distribution of the placement solved from the first {args.warmup} requests, relative to the offline "
        "optimum; mean over seeds (worst seed in brackets). Gap = J / J_opt − 1.",
    ]
    for wname, make in WORKLOADS.items():
        gaps = {k: {m: [] for m in BUDGETS} for k in ESTIMATORS}
        for seed in tqdm(range(args.seeds), desc=wname):
            wl = make(args.num_requests, seed, args.block_size)
            p = wl.true_distribution(MAX_DEPTH)
            counts = np.zeros(MAX_DEPTH + 1)
            np.add.at(counts, [min(r.depth, MAX_DEPTH) for r in wl.requests[: args.warmup]], 1)
            for m in BUDGETS:
                j_opt = expected_recompute(p, optimal_checkpoints(p, m))
                for name, est in ESTIMATORS.items():
                    q = est(counts, p)
                    gaps[name][m].append(expected_recompute(p, optimal_checkpoints(q / q.sum(), m)) / j_opt - 1)
        lines += ["", f"## {wname}", "", "| estimator | " + " | ".join(f"M={m}" for m in BUDGETS) + " |"]
        lines.append("|---|" + "---|" * len(BUDGETS))
        for name in ESTIMATORS:
            cells = [f"{100 * np.mean(v):+.1f}% ({100 * np.max(v):+.1f}%)" for v in gaps[name].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
