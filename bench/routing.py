"""Routing policies for a fleet of replicas: simulated at scale, and the routing cost at 128 replicas.

    .venv/bin/python bench/routing.py sim [--replicas 8 32 128] [--calibrate]
    .venv/bin/python bench/routing.py cost [--replicas 128] [--blocks 1000000]
    .venv/bin/python bench/routing.py real [--policies ...] [--workloads ...] [--vllm-router]

real: bench/routing_real.py: N replicas of the bundled model on this machine, one run per policy and workload
(`kvserve serve --replicas N --routing P` under `kvserve bench`), beside one engine alone and, with
--vllm-router, vLLM's router (cache_aware) in front of N single kvserve servers: fleet hit rate, TTFT P50/P99,
output tok/s, requests per replica. Writes bench/results/routing_real.{json,md}.

sim: the real policy classes (kvserve/router/) and two baselines (Ray Serve's default power-of-two choices,
Ray's prefix-tree router) in front of modelled engines that are kvserve's own scheduler, cache manager and
block pool with real pool sizes and a step-time model (bench/routing_sim.py). Workloads:
  document-qa  questions about 40 documents per replica (1,000-2,000 tokens, Zipf-popular);
  hot-prefix   70% of requests start with one 1,500-token system prompt (the rest are document-qa), at a rate
               that one replica alone cannot serve.
Per policy and fleet size: prefix-cache hit rate relative to one engine with the fleet's total memory (the
same trace through one pool of N x the blocks), load imbalance (mean over arrivals of max / mean queued
prompt tokens), P99 queueing delay (arrival to admission), TTFT P50/P99, routing cost per request.
--calibrate fits the step-time model on this machine first (the bundled model, one engine, bf16 when the CPU
has it): steps of 1, 8 and 32 decodes over 64 tokens of context, and prefills of 512 and 1,024 tokens.

cost: a router index of --blocks blocks spread over --replicas replicas; the time to route a 2,000-token
request (its block keys computed from token ids, then the policy), mean of 200.

Writes bench/results/routing_sim.{json,md,png} and bench/results/routing_cost.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

from routing_sim import (  # noqa: E402
    StepModel,
    TraceRequest,
    document_qa_trace,
    simulate,
    single_engine_hit_rate,
)

POLICIES = ("round-robin", "least-load", "pow2", "ray-prefix", "prefix-aware", "cache-aware")
BLOCK_SIZE = 16


def pool_blocks() -> int:
    """KV blocks of one replica serving the bundled model with the default budget (10% of RAM, at most 4 GiB)
    in bfloat16, as `kvserve serve` sizes it on this machine."""
    from gguf import GGUFReader

    from kvserve.config import EngineConfig
    from kvserve.model.config import ModelConfig
    from kvserve.model.loader import resolve_model_path

    cfg = ModelConfig.from_gguf(GGUFReader(str(resolve_model_path("smollm2-135m"))))
    per_block = cfg.num_attention_layers * 2 * BLOCK_SIZE * cfg.num_key_value_heads * cfg.head_dim * 2
    return EngineConfig().kv_cache_bytes // per_block


def hot_prefix_trace(replicas: int, seed: int = 0, per_replica: int = 30, rate_per_replica: float = 2.0):
    rng = random.Random(seed + 1)
    hot = [rng.randrange(1, 49_000) for _ in range(1500)]
    qa = document_qa_trace(replicas, seed, per_replica, rate_per_replica)
    out = []
    for r in qa:
        if rng.random() < 0.7:
            suffix = [rng.randrange(1, 49_000) for _ in range(rng.randrange(100, 300))]
            out.append(TraceRequest(r.arrival, hot + suffix, r.output_len))
        else:
            out.append(r)
    return out


WORKLOADS = {"document-qa": document_qa_trace, "hot-prefix": hot_prefix_trace}


def calibrate() -> StepModel:
    """Least-squares fit of base + per_token x prefill + per_sequence x sequences to measured steps."""
    import torch

    from kvserve import LLM, SamplingParams

    dtype = "bfloat16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "float32"
    llm = LLM("smollm2-135m", dtype=dtype, num_kv_blocks=4096)
    engine, samples = llm.engine, []
    rng = random.Random(0)
    for batch in (1, 8, 32):
        prompts = [[rng.randrange(1, 49_000) for _ in range(64)] for _ in range(batch)]
        params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
        for ids in prompts:
            llm.engine.add_request(ids, params)
        engine.step()  # the prefill
        times = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        samples.append((0, batch, statistics.median(times[2:])))
    for n in (512, 1024):
        ids = [rng.randrange(1, 49_000) for _ in range(n)]
        engine.add_request(ids, SamplingParams(max_tokens=1))
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        samples.append((n, 1, time.perf_counter() - t0))
    # three unknowns, five equations: least squares
    a = torch.tensor([[1.0, p, s] for p, s, _ in samples], dtype=torch.float64)
    b = torch.tensor([[t] for _, _, t in samples], dtype=torch.float64)
    base, per_token, per_seq = torch.linalg.lstsq(a, b).solution.flatten().tolist()
    model = StepModel(max(base, 1e-4), max(per_token, 1e-6), max(per_seq, 1e-6))
    print(f"calibrated ({dtype}): {model} from {samples}")
    return model


def run_sim(replica_counts: list[int], model: StepModel, seed: int) -> dict:
    from tqdm import tqdm

    blocks = pool_blocks()
    rows = []
    cases = [(w, n, p) for w in WORKLOADS for n in replica_counts for p in POLICIES]
    refs: dict[tuple[str, int], float] = {}
    for workload, n, policy in tqdm(cases, desc="simulating", unit="case"):
        trace = WORKLOADS[workload](n, seed)
        if (workload, n) not in refs:
            refs[workload, n] = single_engine_hit_rate(trace, blocks * n, BLOCK_SIZE)
        r = simulate(policy, trace, n, blocks, BLOCK_SIZE, model, seed)
        row = {"workload": workload, **asdict(r), "single_engine_hit_rate": refs[workload, n]}
        row["relative_hit_rate"] = r.hit_rate / refs[workload, n] if refs[workload, n] else 0.0
        rows.append(row)
    return {"pool_blocks": blocks, "step_model": asdict(model), "rows": rows}


def run_cost(replicas: int, blocks: int, seed: int) -> dict:
    from kvserve.router.policies import ReplicaLoad
    from kvserve.router.router import Router

    rng = random.Random(seed)
    out = {}
    for policy in ("prefix-aware", "cache-aware"):
        router = Router(policy, BLOCK_SIZE)
        names = [f"r{i:03d}" for i in range(replicas)]
        for _ in range(0, blocks, 1000):  # chains of 1,000 blocks, each on one or two replicas
            keys = [rng.getrandbits(64) for _k in range(1000)]
            for name in rng.sample(names, rng.choice((1, 2))):
                router.index.add(name, keys)
        loads = [ReplicaLoad(n, running=rng.randrange(8), queued_tokens=rng.randrange(4096)) for n in names]
        prompts = [[rng.randrange(1, 49_000) for _ in range(2000)] for _ in range(200)]
        t0 = time.perf_counter()
        requests = [router.request(p) for p in prompts]
        t1 = time.perf_counter()
        for req in requests:
            router.route(req, loads)
        t2 = time.perf_counter()
        out[policy] = {
            "keys_us": (t1 - t0) / len(prompts) * 1e6,
            "decision_us": (t2 - t1) / len(prompts) * 1e6,
            "index_blocks": len(router.index),
        }
    return {"replicas": replicas, "blocks": blocks, **out}


def write_sim(result: dict) -> None:
    rows = result["rows"]
    lines = [
        "| workload | replicas | policy | hit rate vs one engine | imbalance | P99 queueing s | TTFT P50 s | "
        "TTFT P99 s | route us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['replicas']} | {r['policy']} | {r['relative_hit_rate']:.2f} | "
            f"{r['imbalance']:.2f} | {r['p99_queueing_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['p99_ttft_s']:.2f} | "
            f"{r['route_us']:.0f} |"
        )
    (RESULTS / "routing_sim.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "routing_sim.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for policy in POLICIES:
        qa = [r for r in rows if r["policy"] == policy and r["workload"] == "document-qa"]
        hot = [r for r in rows if r["policy"] == policy and r["workload"] == "hot-prefix"]
        axes[0].plot([r["replicas"] for r in qa], [r["relative_hit_rate"] for r in qa], marker="o", label=policy)
        axes[1].plot([r["replicas"] for r in hot], [r["p99_ttft_s"] for r in hot], marker="o", label=policy)
    axes[0].set(xscale="log", xlabel="replicas", ylabel="hit rate / one engine's", title="document-qa: prefix hits")
    axes[1].set(xscale="log", yscale="log", xlabel="replicas", ylabel="P99 TTFT (s)", title="hot-prefix: P99 TTFT")
    for ax in axes:
        ax.set_xticks([r["replicas"] for r in rows if r["policy"] == POLICIES[0] and r["workload"] == "document-qa"])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    m = result["step_model"]
    fig.suptitle(
        "Simulated fleets: kvserve's scheduler and block pool per replica; step = "
        f"{m['base'] * 1e3:.1f} ms + {m['per_prefill_token'] * 1e3:.2f} ms/prefill token + "
        f"{m['per_sequence'] * 1e3:.2f} ms/sequence",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "routing_sim.png", dpi=120)
    print("\n".join(lines))


def write_real(result: dict, name: str = "routing_real") -> None:
    lines = [
        "| workload | system | hit rate | TTFT P50 ms | TTFT P99 ms | TPOT P99 ms | output tok/s "
        "| requests per replica |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per = r.get("requests_per_replica")
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['hit_rate']:.3f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['tpot_p99_ms']:.0f} | {r['output_tok_s']:.1f} | "
            f"{'' if per is None else per} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--replicas", type=int, nargs="+", default=[8, 32, 128])
    sim.add_argument("--calibrate", action="store_true")
    sim.add_argument("--seed", type=int, default=0)
    real = sub.add_parser("real")
    real.add_argument("--policies", nargs="+", default=["round-robin", "least-load", "prefix-aware", "cache-aware"])
    real.add_argument(
        "--workloads", nargs="+", default=["document-qa", "multi-turn", "agent-loop", "shared-system-prompt"]
    )
    real.add_argument("--replicas", type=int, default=2)
    real.add_argument("--threads", type=int, default=2, help="CPU threads in all (split between replicas)")
    real.add_argument("--dtype", default="bfloat16")
    real.add_argument("--num-requests", type=int, default=32)
    real.add_argument("--concurrency", type=int, default=8)
    real.add_argument("--max-tokens", type=int, default=32)
    real.add_argument("--vllm-router", action="store_true")
    real.add_argument("--disaggregate", default=None, help="also a P:D disaggregated fleet (cache-aware)")
    real.add_argument("--name", default="routing_real", help="results file stem under bench/results/")
    cost = sub.add_parser("cost")
    cost.add_argument("--replicas", type=int, default=128)
    cost.add_argument("--blocks", type=int, default=1_000_000)
    cost.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    stamp = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.part == "real":
        from routing_real import run_real

        opts = {k: getattr(args, k) for k in ("replicas", "threads", "dtype", "num_requests", "concurrency")}
        opts.update(model="smollm2-135m", max_tokens=args.max_tokens)
        result = {**stamp, **run_real(args.policies, args.workloads, opts, args.vllm_router, args.disaggregate)}
        write_real(result, args.name)
    elif args.part == "sim":
        model = calibrate() if args.calibrate else StepModel()
        write_sim({**stamp, **run_sim(args.replicas, model, args.seed)})
    else:
        result = {**stamp, **run_cost(args.replicas, args.blocks, args.seed)}
        (RESULTS / "routing_cost.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
