"""Speculative decoding through the server: output tok/s with --speculative off / ngram:K / suffix:K.

    .venv/bin/python bench/speculative.py [--k 4] [--num-requests 8] [--max-tokens 64] [--threads 2]

One `kvserve serve` per setting (all three started first, each idle while another runs), on 127.0.0.1. For
each workload (document-qa: answers that quote the document; copy-edit: the answer repeats its prompt;
agent-loop; no-sharing) and concurrency (1 and 8) the same requests go to each server in turn, the order
rotating from cell to cell against drift; greedy, every answer runs to --max-tokens. Reports output tok/s
(over the run, prefill included) and its ratio to off, the mean time per output token (TPOT, decode alone)
relative to off, and the acceptance rate from each server's /metrics; writes bench/results/speculative.json,
speculative.md and a plot speculative.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from kvserve.bench.client import ClientConfig, run_requests
from kvserve.bench.report import summarize
from kvserve.bench.server_metrics import scrape, summarize_server
from kvserve.bench.workloads import build_workload

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
KVSERVE = Path(sys.executable).parent / "kvserve"
WORKLOADS = ("document-qa", "copy-edit", "agent-loop", "no-sharing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, flags: list[str], threads: int):
        self.name, self.port = name, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [str(KVSERVE), "serve", "smollm2-135m", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the server exited")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: not ready in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def measure(server: Server, workload: str, concurrency: int, args: argparse.Namespace) -> dict:
    requests = build_workload(workload, args.num_requests * concurrency, seed=0)
    cfg = ClientConfig(
        base_url=server.base_url,
        model="smollm2-135m",
        max_tokens=args.max_tokens,
        concurrency=concurrency,
        ignore_eos=True,
    )
    before = await scrape(server.base_url)
    run = await run_requests(requests, cfg)
    after = await scrape(server.base_url)
    s = summarize(run, workload=workload, concurrency=concurrency, system=server.name)
    spec = (summarize_server(before, after) or {}).get("spec_decode") or {}
    return {
        "failed": s["failed"],
        "output_tok_s": s["output_tokens_per_s"],
        "tpot_ms": s["tpot_ms"]["mean"],
        "ttft_ms": s["ttft_ms"]["median"],
        "acceptance_rate": spec.get("acceptance_rate"),
        "draft_tokens": spec.get("draft_tokens"),
    }


def report(results: dict, settings: list[str]) -> str:
    """Output tok/s (prefill included), its ratio to off, the TPOT ratio (decode alone) and the acceptance."""
    spec = settings[1:]
    head = ["workload", "concurrency", *(f"{n} tok/s" for n in settings), *(f"{n} / off" for n in spec)]
    head += [*(f"{n} TPOT / off" for n in spec), *(f"{n} accepted" for n in spec)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell, by in results.items():
        workload, conc = cell.split("@")
        off = by[settings[0]]
        row = [workload, conc] + [f"{by[n]['output_tok_s']:.1f}" for n in settings]
        row += [f"{by[n]['output_tok_s'] / off['output_tok_s']:.2f}x" for n in spec]
        row += [f"{by[n]['tpot_ms'] / off['tpot_ms']:.2f}" for n in spec]
        row += ["n/a" if by[n]["acceptance_rate"] is None else f"{100 * by[n]['acceptance_rate']:.0f}%" for n in spec]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, settings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(settings)
    for i, name in enumerate(settings):
        values = [results[c][name]["output_tok_s"] / results[c][settings[0]]["output_tok_s"] for c in cells]
        ax.bar([x + i * width for x in range(len(cells))], values, width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + width * (len(settings) - 1) / 2 for x in range(len(cells))])
    ax.set_xticklabels([c.replace("@", "\nconcurrency ") for c in cells], fontsize=8)
    ax.set_ylabel("output tok/s relative to off")
    ax.set_title("Speculative decoding (same tokens), bundled SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=4, help="requests per unit of concurrency")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    settings = {"off": [], f"ngram:{args.k}": ["--speculative", f"ngram:{args.k}"]}
    settings[f"suffix:{args.k}"] = ["--speculative", f"suffix:{args.k}"]
    servers = [Server(name, flags, args.threads) for name, flags in settings.items()]
    results: dict[str, dict] = {}
    try:
        for s in servers:
            s.wait_ready()
        cells = [(w, c) for w in args.workloads for c in args.concurrency]
        for i, (workload, conc) in enumerate(tqdm(cells, desc="cells")):
            order = servers[i % len(servers) :] + servers[: i % len(servers)]
            results[f"{workload}@{conc}"] = {s.name: asyncio.run(measure(s, workload, conc, args)) for s in order}
    finally:
        for s in servers:
            s.stop()
    names = list(settings)
    table = report(results, names)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    header = f"`.venv/bin/python bench/speculative.py {' '.join(sys.argv[1:])}`\n\n"
    (RESULTS / "speculative.md").write_text(header + table + "\n")
    plot(results, names, RESULTS / "speculative.png")


if __name__ == "__main__":
    main()
