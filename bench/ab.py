"""A/B: one benchmark on two source trees of kvserve, in alternation, to tell a regression from drift.

    .venv/bin/python bench/ab.py --trees ../baseline . --rounds 3 serve --workload shared-system-prompt
    .venv/bin/python bench/ab.py --trees ../baseline . --rounds 3 offline

Each tree is a checkout (e.g. `git worktree add ../baseline <commit>`) run with this venv and PYTHONPATH set
to it, so only kvserve's code differs. This machine kind's speed drifts by tens of percent over minutes, so
the trees take turns, round after round (A B, B A, A B, ...), and each metric is reported as the median over
rounds with its range.
  serve    `kvserve serve` (prefix caching on) under bench/compare.py's client and workload: TTFT p50/p99,
           TPOT, output tokens/s.
  offline  each tree's own bench/offline.py (bfloat16; its API may differ between trees): prefill tokens/s at
           512 and 2,048 tokens, decode tokens/s at batch 1 and 32, TTFT with a cached 2,000-token prefix.
Writes bench/results/ab-<bench>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import add_run_args, measure  # noqa: E402

SERVE_METRICS = {  # name -> path in the client's summary
    "TTFT p50 ms": ("ttft_ms", "median"),
    "TTFT p99 ms": ("ttft_ms", "p99"),
    "TPOT mean ms": ("tpot_ms", "mean"),
    "out tok/s": ("output_tokens_per_s",),
}


def _dig(d: dict, path: tuple) -> float:
    for key in path:
        d = d[key]
    return float(d)


def run_serve(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    os.environ["PYTHONPATH"] = str(tree)  # the server process imports kvserve from this tree
    summary = measure("kvserve", args)
    return {name: _dig(summary, path) for name, path in SERVE_METRICS.items()}


def run_offline(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "offline.json"
        cmd = [sys.executable, str(tree / "bench" / "offline.py"), "--dtypes", "bfloat16", "--out", str(out)]
        cmd += ["--decode-rounds", "1", "--floor-rounds", "1"]
        subprocess.run(cmd, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
        r = json.loads(out.read_text())["dtypes"]["bfloat16"]
    return {
        "prefill 512 tok/s": r["prefill"][0]["kvserve_tok_s"],
        "prefill 2048 tok/s": r["prefill"][1]["kvserve_tok_s"],
        "decode b1 tok/s": r["decode"][0]["tok_s"],
        "decode b32 tok/s": r["decode"][1]["tok_s"],
        "TTFT cached prefix ms": r["ttft"]["warm_s"] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--rounds", type=int, default=3)
    sub = ap.add_subparsers(dest="bench", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--workload", default="shared-system-prompt")
    add_run_args(serve, num_requests=48)
    sub.add_parser("offline")
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    run = run_serve if args.bench == "serve" else run_offline
    results: dict[str, list[dict[str, float]]] = {str(t): [] for t in trees}
    for i in range(args.rounds):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            print(f"== round {i + 1}/{args.rounds}: {tree}", flush=True)
            results[str(tree)].append(run(tree, args))
    names = list(next(iter(results.values()))[0])
    print(f"\n{'metric':<24}" + "".join(f"{t.name:>28}" for t in trees) + f"{'B/A':>8}")
    for name in names:
        medians = [statistics.median(r[name] for r in results[str(t)]) for t in trees]
        cells = []
        for t, med in zip(trees, medians):
            vals = [r[name] for r in results[str(t)]]
            cells.append(f"{med:.1f} ({min(vals):.1f}-{max(vals):.1f})")
        print(f"{name:<24}" + "".join(f"{c:>28}" for c in cells) + f"{medians[1] / medians[0]:>8.3f}")
    out = ROOT / "results" / f"ab-{args.bench}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "rounds": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
