"""What prefix caching costs where it cannot help: kvserve with caching on vs off, alternated, on no-sharing.

    .venv/bin/python bench/cache_overhead.py [--workload no-sharing --rounds 3 --num-requests 32
        --concurrency 8 --max-tokens 32]

One run of each server (bench/compare.py) cannot resolve a 5% difference on a two-core machine shared with
anything else: run-to-run drift alone is of that size. This script runs the two servers in alternating order
(on, off, off, on, on, off, ...), each with the same requests from the same client, and reports every round's
ratio (on over off) and the median over rounds, for output throughput and TTFT. Writes
bench/results/cache_overhead-WORKLOAD.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (bench/compare.py, a sibling script)

from kvserve.bench.workloads import WORKLOADS  # noqa: E402

METRICS = (  # (label, summary path, higher is better)
    ("out tok/s", ("output_tokens_per_s",), True),
    ("TTFT p50 ms", ("ttft_ms", "median"), False),
    ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    ("TPOT mean ms", ("tpot_ms", "mean"), False),
)


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, system) in ABBA order, so a slow drift of the machine hits both systems alike."""
    on, off = "kvserve", "kvserve-nocache"
    return [(r, s) for r in range(rounds) for s in ((on, off) if r % 2 == 0 else (off, on))]


def table(rows: list[dict]) -> str:
    head = "| round | " + " | ".join(f"{m} on / off" for m, _, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for r in rows:
        lines.append(f"| {r['round']} | " + " | ".join(r[m] for m, _, _ in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="no-sharing", choices=sorted(WORKLOADS))
    p.add_argument("--rounds", type=int, default=3)
    compare.add_run_args(p, num_requests=32)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    runs: dict[tuple[int, str], dict] = {}
    for r, system in order(args.rounds):
        print(f"== round {r + 1}/{args.rounds}: {system}", flush=True)
        runs[(r, system)] = compare.measure(system, args)
        time.sleep(2)
    rows, ratios = [], {m: [] for m, _, _ in METRICS}
    for r in range(args.rounds):
        on, off = runs[(r, "kvserve")], runs[(r, "kvserve-nocache")]
        row = {"round": str(r + 1)}
        for label, path, _ in METRICS:
            a, b = compare._get(on, path), compare._get(off, path)
            ratio = a / b if a is not None and b else float("nan")
            ratios[label].append(ratio)
            row[label] = f"{a:,.1f} / {b:,.1f} = {ratio:.3f}"
        rows.append(row)
    med = {label: statistics.median(v) for label, v in ratios.items()}
    rows.append({"round": "**median**", **{label: f"**{med[label]:.3f}**" for label in med}})
    failed = sum(s["failed"] for s in runs.values())
    cmd = " ".join([".venv/bin/python bench/cache_overhead.py", *sys.argv[1:]])
    text = (
        f"### Prefix caching on vs off, {args.workload}\n\n`{cmd}`\n\n{compare.machine_line()}\n\n"
        f"{args.rounds} rounds, {args.num_requests} requests each at concurrency {args.concurrency}, "
        f"{args.max_tokens} output tokens; order on/off alternating (ABBA). Failed requests: {failed}.\n\n"
        + table(rows)
        + "\n"
    )
    out = compare.RESULTS / f"cache_overhead-{args.workload}"
    compare.RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    blob = {"ratios": ratios, "median": med, "runs": {f"{r}-{s}": v for (r, s), v in runs.items()}}
    out.with_suffix(".json").write_text(json.dumps(blob, indent=1, default=str))
    print("\n" + text)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
