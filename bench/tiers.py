"""KV tiers and eviction policies under a small fast pool, measured through the real server.

    .venv/bin/python bench/tiers.py tiers      # document-qa, pool of ~3 documents: none | cpu | disk | redis
    .venv/bin/python bench/tiers.py policies   # system prompts + a scan of one-off long prompts: lru | lfu | cost-aware
    .venv/bin/python bench/tiers.py all [--num-requests N --concurrency C --max-tokens T]

Each configuration starts `kvserve serve` (bench/peers.py's launcher) with its flags, sends the same requests
(same seed) with the kvserve.bench client, reads prefix-cache hit rate (cached / prompt tokens, as the server
reports it per request), TTFT P50/P99 and output throughput, and also the per-tier counters from /metrics.
Results go to bench/results/tiers.md, policies.md, and PNG bar charts. Disk stores go to a fresh temporary
directory; Redis runs on a free loopback port (redis-server from the distribution) and is stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from kvserve.bench import scenes  # noqa: E402
from kvserve.bench.client import ClientConfig, run_requests, warm_up  # noqa: E402
from kvserve.bench.corpus import prose  # noqa: E402
from kvserve.bench.report import summarize  # noqa: E402
from kvserve.bench.workloads import BenchRequest, document_qa  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, workdir: str):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*argv, "--dir", workdir], stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def kvserve_peer(name: str, flags: list[str]) -> peers.Peer:
    def argv(gguf, r):
        return [str(peers.KVSERVE), "serve", peers.MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(r.port), *flags]

    return peers.Peer(name, argv, peers.KVSERVE.exists, startup_s=180)


def tier_metrics(base_url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("kvserve:kv_tier") or line.startswith("kvserve:kv_blocks_evicted"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def measure(name: str, flags: list[str], requests: list[BenchRequest], args) -> dict:
    print(f"== {name}: kvserve serve {' '.join(flags)}", flush=True)
    launch = peers.Launch(free_port(), args.concurrency, args.threads)
    with peers.RunningPeer(kvserve_peer(name, flags), launch) as running:
        cfg = ClientConfig(
            base_url=running.base_url,
            model=peers.MODEL_ALIAS,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            seed=args.seed,
            ignore_eos=True,
            timeout_s=900,
        )
        asyncio.run(warm_up(cfg, 2))
        run = asyncio.run(run_requests(requests, cfg, progress=sys.stderr.isatty()))
        metrics = tier_metrics(running.base_url)
    s = summarize(run, system=name, flags=flags)
    s["tier_metrics"] = metrics
    print(
        f"   hit rate {s['prefix_cache_hit_rate']:.3f}  TTFT p50 {s['ttft_ms']['median']:.0f} ms  "
        f"p99 {s['ttft_ms']['p99']:.0f} ms  out {s['output_tokens_per_s']:.1f} tok/s  failed {s['failed']}",
        flush=True,
    )
    return s


# -------------------------------------------------------------------------------------------- workloads
def scan_mix(n: int, seed: int, num_systems: int = 3, system_tokens: int = 600, scan_tokens: int = 1500,
             scan_every: int = 3) -> list[BenchRequest]:  # fmt: skip
    """Short questions behind a few system prompts, and every scan_every-th request a one-off long prompt."""
    rng = random.Random(seed)
    systems = [scenes.support_system_prompt(rng, system_tokens) for _ in range(num_systems)]
    out = []
    for i in range(n):
        if i % scan_every == scan_every - 1:
            text = f"Ticket {rng.randrange(10**8):08d}. Summarise this log.\n\n{prose(rng, scan_tokens)}\nSummary:"
            out.append(BenchRequest(prompt=text, group="scan"))
        else:
            k = rng.randrange(num_systems)
            sys_msg = {"role": "system", "content": systems[k]}
            out.append(BenchRequest(messages=(sys_msg, {"role": "user", "content": scenes.support_question(rng)}),
                                    group=f"system-{k}"))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ report
def table(title: str, command: str, rows: dict[str, dict], tier_cols: bool) -> str:
    head = "| config | hit rate | TTFT p50 ms | TTFT p99 ms | out tok/s | req/s | pool evictions |"
    if tier_cols:
        head += " tier hits (blocks) | tier load mean ms |"
    out = [f"### {title}", "", f"`{command}`", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in rows.items():
        m = s["tier_metrics"]
        cells = [
            f"{s['prefix_cache_hit_rate']:.3f}",
            f"{s['ttft_ms']['median']:,.0f}",
            f"{s['ttft_ms']['p99']:,.0f}",
            f"{s['output_tokens_per_s']:.1f}",
            f"{s['request_throughput']:.3f}",
            f"{m.get('kvserve:kv_blocks_evicted_total', 0):,.0f}",
        ]
        if tier_cols:
            hits = sum(v for k, v in m.items() if k.startswith("kvserve:kv_tier_hits_total"))
            n = sum(v for k, v in m.items() if k.startswith("kvserve:kv_tier_load_seconds_count"))
            t = sum(v for k, v in m.items() if k.startswith("kvserve:kv_tier_load_seconds_sum"))
            cells += [f"{hits:,.0f}", f"{1000 * t / n:.1f}" if n else "n/a"]
        if s["failed"]:
            cells[0] += f" ({s['failed']} failed)"
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(path: Path, title: str, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    series = [
        ("prefix-cache hit rate", [rows[n]["prefix_cache_hit_rate"] for n in names]),
        ("TTFT p50 / p99 (s)", None),
        ("output tokens/s", [rows[n]["output_tokens_per_s"] for n in names]),
    ]
    for ax, (label, values) in zip(axes, series):
        if values is None:
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], [rows[n]["ttft_ms"]["median"] / 1000 for n in names], 0.4, label="p50")
            ax.bar([i + 0.2 for i in x], [rows[n]["ttft_ms"]["p99"] / 1000 for n in names], 0.4, label="p99")
            ax.legend()
        else:
            ax.bar(names, values, color="tab:blue")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- runs
def run_tiers(args) -> None:
    requests = document_qa(args.num_requests, args.seed, num_documents=args.documents)
    pool = ["--num-kv-blocks", str(args.pool_blocks)]
    work = tempfile.mkdtemp(prefix="kvserve-tiers-")
    redis = Redis(work)
    try:
        configs = {
            "no tiers": pool,
            "host RAM": [*pool, "--cpu-offload-gb", "4"],
            "disk": [*pool, "--kv-store", f"disk:{work}/store"],
            "redis": [*pool, "--kv-store", redis.url],
        }
        rows = {name: measure(name, flags, requests, args) for name, flags in configs.items()}
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    title = (
        f"document-qa, {args.documents} documents of ~2,000 tokens, fast pool {args.pool_blocks} blocks "
        f"(~{args.pool_blocks * BLOCK_TOKENS // 2100} documents), {args.num_requests} requests, "
        f"concurrency {args.concurrency}, {args.max_tokens} output tokens"
    )
    md = table(title, " ".join([".venv/bin/python bench/tiers.py", *sys.argv[1:]]), rows, tier_cols=True)
    (RESULTS / "tiers.md").write_text(md)
    plot(RESULTS / "tiers.png", "KV tiers under a small pool (document-qa)", rows)
    print(md)


def run_policies(args) -> None:
    requests = scan_mix(args.num_requests, args.seed)
    pool = ["--num-kv-blocks", str(args.policy_pool_blocks)]
    rows = {p: measure(p, [*pool, "--eviction-policy", p], requests, args) for p in ("lru", "lfu", "cost-aware")}
    title = (
        f"3 system prompts of ~600 tokens with short questions, every 3rd request a one-off ~1,500-token prompt; "
        f"pool {args.policy_pool_blocks} blocks, {args.num_requests} requests, concurrency {args.concurrency}"
    )
    md = table(title, " ".join([".venv/bin/python bench/tiers.py", *sys.argv[1:]]), rows, tier_cols=False)
    (RESULTS / "policies.md").write_text(md)
    plot(RESULTS / "policies.png", "Eviction policies: system prompts + a scan", rows)
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tiers", "policies", "all"])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--pool-blocks", type=int, default=400, help="fast pool for the tiers run (~3 documents)")
    p.add_argument("--policy-pool-blocks", type=int, default=200, help="fast pool for the policies run")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.what in ("tiers", "all"):
        run_tiers(args)
    if args.what in ("policies", "all"):
        run_policies(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
