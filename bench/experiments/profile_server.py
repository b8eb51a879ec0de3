"""Where a kvserve server spends its time under a benchmark workload: py-spy samples the server process while
kvserve.bench drives it, and the samples are summed by kvserve function (inclusive) and by leaf frame.

    .venv/bin/pip install py-spy      # a profiling tool, not a kvserve dependency
    .venv/bin/python bench/experiments/profile_server.py --workload shared-system-prompt --num-requests 24 \
        --concurrency 8

Writes bench/experiments/results/profile-WORKLOAD.txt (tables) and profile-WORKLOAD.folded (collapsed stacks, for
flamegraph.pl or speedscope).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the sibling scripts
import peers  # noqa: E402
from tiers import free_port, kvserve_peer  # noqa: E402

from kvserve.bench.client import ClientConfig, run_requests, warm_up  # noqa: E402
from kvserve.bench.report import format_table, summarize  # noqa: E402
from kvserve.bench.workloads import build_workload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def summarize_stacks(folded: Path, top: int = 30) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if not any("kvserve-engine" in f or "_run (kvserve/server/async_engine.py" in f for f in frames):
            continue  # only the engine thread
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            if "kvserve/" in f and "(" in f:
                inclusive[f] += n
    out = [f"engine-thread samples: {total}", "", "inclusive, kvserve functions:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "leaf frames (self time):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="shared-system-prompt")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("flags", nargs="*", help="extra kvserve serve flags (after --)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    requests = build_workload(args.workload, args.num_requests, 0)
    folded = RESULTS / f"profile-{args.workload}.folded"
    peer = kvserve_peer("kvserve", args.flags)
    with peers.RunningPeer(peer, peers.Launch(free_port(), args.concurrency, args.threads)) as running:
        cfg = ClientConfig(base_url=running.base_url, model=peers.MODEL_ALIAS, max_tokens=args.max_tokens,
                           concurrency=args.concurrency, seed=0, ignore_eos=True, timeout_s=900)  # fmt: skip
        asyncio.run(warm_up(cfg, 2))
        rec = subprocess.Popen([spy, "record", "--pid", str(running.proc.pid), "--rate", str(args.rate),
                                "--format", "raw", "--threads", "-o", str(folded)])  # fmt: skip
        run = asyncio.run(run_requests(requests, cfg, progress=sys.stderr.isatty()))
        rec.send_signal(2)
        rec.wait(60)
    print(format_table(summarize(run, system="kvserve", workload=args.workload)))
    text = summarize_stacks(folded)
    (RESULTS / f"profile-{args.workload}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
