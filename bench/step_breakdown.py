"""Where a step's time goes: linear layers, attention, the rest, for prefill and for decode steps.

    .venv/bin/python bench/step_breakdown.py [--dtypes float32 bfloat16] [--attention native torch]

Wraps the model's `linear` and `paged_attention` with timers (same process, nothing else changed) and
reports, per dtype and attention path: a 2,048-token prefill (best of 3) and the median decode step at
batch 1 and 32 (64-token prompts, 20 steps after 5 warm-up steps). KVSERVE_ATTENTION picks the path, so
`--attention torch` shows the torch path's numbers on the same machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run_one(dtype: str) -> None:
    sys.path.insert(0, str(ROOT))
    from offline import prompt_ids, timed_first_token

    import kvserve.model.llama as llama
    from kvserve import LLM, SamplingParams
    from kvserve.model.loader import load_model

    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    llama.linear = timed("linear", llama.linear)
    llama.paged_attention = timed("attention", llama.paged_attention)
    loaded = load_model("smollm2-135m")
    llm = LLM(loaded=loaded, dtype=dtype, max_num_batched_tokens=4096, max_num_seqs=64, enable_prefix_caching=False)
    path = "native" if llm.engine.runner.native else "torch"
    ids = prompt_ids(llm, 2048)
    timed_first_token(llm, ids)
    best = None
    for _ in range(3):
        spent.clear()
        total = timed_first_token(llm, ids)
        if best is None or total < best[0]:
            best = (total, dict(spent))
    total, parts = best
    print(
        f"{dtype:9s} {path:6s} prefill 2048: total {total * 1e3:7.1f} ms  linear {parts['linear'] * 1e3:7.1f}"
        f"  attention {parts['attention'] * 1e3:7.1f}  rest {(total - sum(parts.values())) * 1e3:6.1f}"
    )
    eng = llm.engine
    for batch in (1, 32):
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        reqs = [eng.add_request(prompt_ids(llm, 64, salt=i), params) for i in range(batch)]
        while any(r.num_output_tokens == 0 for r in reqs):
            eng.step()
        for _ in range(5):
            eng.step()
        steps = []
        for _ in range(20):
            spent.clear()
            t0 = time.perf_counter()
            eng.step()
            steps.append((time.perf_counter() - t0, dict(spent)))
        while eng.has_unfinished_requests():
            eng.step()
        steps.sort(key=lambda s: s[0])
        total, parts = steps[len(steps) // 2]
        print(
            f"{dtype:9s} {path:6s} decode b{batch:<3d}   : step  {total * 1e3:7.1f} ms  linear"
            f" {parts['linear'] * 1e3:7.1f}  attention {parts['attention'] * 1e3:7.1f}"
            f"  rest {(total - sum(parts.values())) * 1e3:6.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--attention", nargs="+", default=["native", "torch"], choices=["native", "torch"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(args.one)
    for path in args.attention:
        for dtype in args.dtypes:  # a fresh process each: no allocator or oneDNN state carried over
            env = dict(os.environ, KVSERVE_ATTENTION=path)
            subprocess.run([sys.executable, __file__, "--one", dtype], check=True, env=env)


if __name__ == "__main__":
    main()
