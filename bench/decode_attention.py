"""Decode step time against context length, shared and distinct contexts, beside the machine's limits.

    .venv/bin/python bench/decode_attention.py [--dtype bfloat16] [--batches 1 8 32]
        [--contexts 64 512 1024 2048 4096] [--steps 16] [--max-distinct-tokens 140000]

For each batch size B and context length L, B sequences decode with L tokens of context each:
  * shared:   the L tokens are one prompt's (a system prompt or document) served from the prefix cache, so
              the B sequences' block tables point at the same KV blocks; each sequence adds one token of its own;
  * distinct: B different L-token prompts.
Reported per case: the median decode step (of --steps, after 3 warm-up steps) and, on the native path, the
fused layer's attention clock (summed over the 30 layers); the attention's achieved read bandwidth (the KV
bytes a step must read over the attention time: shared blocks once) and FLOP/s; and the floor of the extra
cost of L over a 64-token context: max(extra KV bytes / read bandwidth, extra attention FLOPs / the cores'
peak in the precision the kernel computes in), both limits measured at the start of the run by
bench/cpu_peak.py. "x floor" = (step(L) - step(64)) / floor.

Writes bench/results/decode_attention.{json,md,png}. Each case builds its batch afresh in one engine; the
machine's speed drifts over minutes, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))


def kv_bytes_per_token(cfg, elem: int) -> int:
    return cfg.num_attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem


def attention_flops(cfg, keys: int) -> float:
    """Multiply-adds x 2 of one query token against `keys` keys, all layers (q.k and p.v)."""
    return 4.0 * cfg.num_attention_layers * cfg.num_attention_heads * cfg.head_dim * keys


def run(args: argparse.Namespace) -> dict:
    import cpu_peak
    from offline import prompt_ids
    from tqdm import tqdm

    from kvserve import LLM, SamplingParams
    from kvserve.engine import NewRequest
    from kvserve.model import native

    peak = cpu_peak.measure(0.5, quiet=True)
    llm = LLM(
        "smollm2-135m",
        dtype=args.dtype,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=4096,
        num_kv_blocks=args.kv_blocks,
        enable_prefix_caching=True,
    )
    eng = llm.engine
    cfg = eng.model_config
    fused = bool(getattr(eng._runner.model, "fused", False))
    lib = native.load() if fused else None
    bf16_kernel = args.dtype == "bfloat16" and lib is not None and bool(lib.kvserve_attention_features() & 1)
    elem = 2 if args.dtype == "bfloat16" else 4
    flops_peak = (peak["bf16_gflops"] if bf16_kernel else peak["fp32_gflops"]) * 1e9
    read_bw = peak["read_gbs"] * 1e9
    rows = []
    cases = [(b, kind, L) for b in args.batches for kind in ("shared", "distinct") for L in args.contexts]
    cases = [c for c in cases if c[1] == "shared" or c[0] * c[2] <= args.max_distinct_tokens]
    salt = 1000
    for batch, kind, L in tqdm(cases, desc="cases"):
        # every sequence decodes through the timed steps (none finishes early); aborted after them
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        salt += 1
        if kind == "shared":
            base = prompt_ids(llm, L - 1, salt=salt)
            eng.add_requests([NewRequest(base + [7], SamplingParams(temperature=0, max_tokens=1))])  # into the cache
            while eng.has_unfinished_requests():
                eng.step()
            prompts = [base + [100 + i] for i in range(batch)]
        else:
            prompts = [prompt_ids(llm, L, salt=salt * 100 + i) for i in range(batch)]
        ids = eng.add_requests([NewRequest(p, params) for p in prompts])
        while eng.has_unfinished_requests():  # until every prompt is computed: then only decodes run
            out = eng.step()
            if all(len(o.outputs[0].token_ids) > 0 for o in out) and len(out) == batch:
                break
        for _ in range(3):
            eng.step()
        steps, attn = [], []
        for _ in range(args.steps):
            if lib is not None:
                lib.kvserve_layer_timing(1)
            t0 = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t0)
            if lib is not None:
                attn.append(lib.kvserve_layer_section_time(3))
                lib.kvserve_layer_timing(0)
        for rid in ids:
            eng.abort(rid)
        while eng.has_unfinished_requests():
            eng.step()
        ctx = L + 3 + args.steps // 2  # mean context over the timed steps
        read = kv_bytes_per_token(cfg, elem) * ctx * (1 if kind == "shared" else batch)
        rows.append(
            {
                "batch": batch,
                "kind": kind,
                "context": L,
                "step_ms": statistics.median(steps) * 1e3,
                "attention_ms": statistics.median(attn) * 1e3 if attn else None,
                "kv_bytes": read,
                "flops": attention_flops(cfg, ctx) * batch,
            }
        )
    base_ctx = min(args.contexts)
    for r in rows:
        if r["attention_ms"]:
            r["attention_gbs"] = r["kv_bytes"] / (r["attention_ms"] / 1e3) / 1e9
            r["attention_gflops"] = r["flops"] / (r["attention_ms"] / 1e3) / 1e9
        ref = next(x for x in rows if (x["batch"], x["kind"], x["context"]) == (r["batch"], r["kind"], base_ctx))
        extra_keys = r["context"] - base_ctx
        if extra_keys > 0:
            kv = kv_bytes_per_token(cfg, elem) * extra_keys * (1 if r["kind"] == "shared" else r["batch"])
            fl = attention_flops(cfg, extra_keys) * r["batch"]
            floor = max(kv / read_bw, fl / flops_peak)
            r["floor_ms"] = floor * 1e3
            r["extra_ms"] = r["step_ms"] - ref["step_ms"]
            r["x_floor"] = r["extra_ms"] / r["floor_ms"]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": args.dtype,
        "attention": "native" if lib is not None else "torch",
        "kernel_precision": "bf16 (VDPBF16PS)" if bf16_kernel else "float32",
        "peak": peak,
        "rows": rows,
        "command": " ".join(["bench/decode_attention.py", *sys.argv[1:]]),
    }


def markdown(res: dict) -> str:
    p = res["peak"]
    out = [
        f"# `{res['command']}`, {res['date']}",
        "",
        f"{res['dtype']}, {res['attention']} attention computing in {res['kernel_precision']}; measured limits "
        f"(bench/cpu_peak.py, {p['threads']} threads): read {p['read_gbs']:.1f} GB/s, float32 "
        f"{p['fp32_gflops']:.0f} GFLOP/s, bf16 {p['bf16_gflops']:.0f} GFLOP/s.",
        "",
        "| batch | context | kind | step ms | attention ms | attention GB/s | attention GFLOP/s | extra ms | floor ms "
        "| x floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in res["rows"]:
        out.append(
            f"| {r['batch']} | {r['context']} | {r['kind']} | {r['step_ms']:.2f} | {f(r['attention_ms'], '.2f')} "
            f"| {f(r.get('attention_gbs'), '.1f')} | {f(r.get('attention_gflops'), '.1f')} "
            f"| {f(r.get('extra_ms'), '.2f')} | {f(r.get('floor_ms'), '.2f')} | {f(r.get('x_floor'), '.2f')} |"
        )
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for kind, style in (("shared", "o-"), ("distinct", "s--")):
            pts = [(r["context"], r["step_ms"]) for r in res["rows"] if r["batch"] == b and r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{kind}: step")
            floor = [
                (r["context"], r["step_ms"] - r["extra_ms"] + r["floor_ms"])
                for r in res["rows"]
                if r["batch"] == b and r["kind"] == kind and "floor_ms" in r
            ]
            if floor:
                ax.plot(*zip(*floor, strict=True), ":", label=f"{kind}: 64-token step + floor")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("decode step (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode step vs context ({res['dtype']}, {res['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-distinct-tokens", type=int, default=140_000, help="skip distinct cases past B x L")
    ap.add_argument("--kv-blocks", type=int, default=12_000)
    ap.add_argument("--out", default="decode_attention", help="name of the result files under bench/results/")
    args = ap.parse_args()
    res = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (RESULTS / f"{args.out}.md").write_text(text)
    plot(res, RESULTS / f"{args.out}.png")
    print(text)


if __name__ == "__main__":
    main()
