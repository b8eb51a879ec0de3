"""Timing of optimal_checkpoints: O(N*M) growth up to N = 10,000 depths (a script, not a test).

Dense random weights (every depth has p > 0, so the DP runs over all N depths: the worst case), the best of
--repeats runs per (N, M). Fits time = a * N * M + b by least squares and writes a table and a plot:

    .venv/bin/python bench/placement_timing.py            # bench/results/placement_timing.{md,png}
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvserve.recurrent.placement import optimal_checkpoints

RESULTS = Path(__file__).resolve().parent / "results"


def time_one(probs: np.ndarray, m: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = optimal_checkpoints(probs, m)
        best = min(best, time.perf_counter() - t0)
        assert len(out) == m
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[1000, 2000, 4000, 6000, 8000, 10000])
    ap.add_argument("--ms", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "placement_timing")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    cpu = platform.processor() or platform.machine()
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[int, int, float]] = []
    for n in tqdm(args.ns, desc="N"):
        probs = rng.random(n + 1) + 1e-3  # depths 0..N, all of positive weight
        for m in args.ms:
            rows.append((n, m, time_one(probs, m, args.repeats)))

    nm = np.array([n * m for n, m, _ in rows], dtype=float)
    secs = np.array([s for _, _, s in rows])
    a, b = np.polyfit(nm, secs, 1)
    pred = a * nm + b
    r2 = 1 - np.sum((secs - pred) ** 2) / np.sum((secs - secs.mean()) ** 2)
    slope = np.polyfit(np.log(nm), np.log(secs), 1)[0]

    lines = [
        "# optimal_checkpoints timing (DP + monotone convex-hull trick)",
        "",
        f"`bench/placement_timing.py --repeats {args.repeats} --seed {args.seed}`; dense random weights (all N",
        f"depths in the support), best of {args.repeats}; pure Python on one core of {cpu},",
        f"Python {platform.python_version()}; 1-minute load average before the run {load:.2f}. Times in seconds.",
        "",
        "| N \\ M | " + " | ".join(str(m) for m in args.ms) + " |",
        "|---|" + "---|" * len(args.ms),
    ]
    table = {(n, m): s for n, m, s in rows}
    for n in args.ns:
        lines.append(f"| {n} | " + " | ".join(f"{table[n, m]:.4f}" for m in args.ms) + " |")
    lines += [
        "",
        f"Least-squares fit: time = {a * 1e9:.1f} ns x N*M + {b * 1e3:.2f} ms, R^2 = {r2:.4f};",
        f"log-log slope of time against N*M = {slope:.3f} (1 for linear growth in N*M).",
        f"Largest case N = {max(args.ns)}, M = {max(args.ms)}: {table[max(args.ns), max(args.ms)]:.3f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in args.ms:
        pts = [(n * m, table[n, m]) for n in args.ns]
        ax.plot(*zip(*pts), "o", label=f"M = {m}")
    xs = np.linspace(0, nm.max(), 50)
    ax.plot(xs, a * xs + b, "k--", lw=1, label=f"fit {a * 1e9:.0f} ns x N*M (R²={r2:.3f})")
    ax.set_xlabel("N * M (depths x checkpoints)")
    ax.set_ylabel("seconds")
    ax.set_title("optimal_checkpoints: time is linear in N*M")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
