"""Where a step's time goes: linear layers, attention, the rest, for prefill and for decode steps.

    .venv/bin/python bench/step_breakdown.py [--dtypes float32 bfloat16] [--attention native torch]

Reports, per dtype and attention path: a 2,048-token prefill (best of 3) and the median decode step at
batch 1 and 32 (64-token prompts, 20 steps after 5 warm-up steps). On the native path, where one C call
runs every layer (kvserve/model/csrc/layer.c), the layer's own section clocks split it (RMSNorms, the four
linears, RoPE + KV write, attention, SwiGLU); "rest" is everything outside the layers (embedding, final norm,
lm_head, sampling, scheduling). On the torch path the model's `linear` and `paged_attention` are wrapped
with timers. KVSERVE_ATTENTION picks the path, so `--attention torch` shows the torch path on the same
machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# the fused layer's section clocks, in csrc/layer.c's order
SECTIONS = ("norms", "qkv", "rope+kv", "attention", "o_proj", "gate_up+swiglu", "down")


def run_one(dtype: str) -> None:
    sys.path.insert(0, str(ROOT))
    from offline import prefill_all, prompt_ids, timed_first_token

    import kvserve.model.llama as llama
    from kvserve import LLM, SamplingParams
    from kvserve.model import native
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
    fused = llm.engine._runner.model.fused
    path = "native" if llm.engine.backends.native_attention else "torch"
    lib = native.load() if fused else None

    def start() -> None:
        spent.clear()
        if lib is not None:
            lib.kvserve_layer_timing(1)

    def parts() -> dict[str, float]:
        """Seconds per part since start(); "linear" counts the lm_head too on the torch path only."""
        if lib is None:
            return dict(spent)
        sections = {name: lib.kvserve_layer_section_time(i) for i, name in enumerate(SECTIONS)}
        lib.kvserve_layer_timing(0)
        return sections

    def line(what: str, total: float, p: dict[str, float]) -> str:
        cells = "  ".join(f"{k} {v * 1e3:7.2f}" for k, v in p.items())
        rest = (total - sum(p.values())) * 1e3
        return f"{dtype:9s} {path:6s} {what:13s}: {total * 1e3:8.2f} ms  {cells}  rest {rest:6.2f}"

    ids = prompt_ids(llm, 2048)
    timed_first_token(llm, ids)
    best = None
    for _ in range(3):
        start()
        total = timed_first_token(llm, ids)
        if best is None or total < best[0]:
            best = (total, parts())
    print(line("prefill 2048", *best))
    eng = llm.engine
    for batch in (1, 32):
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        prefill_all(eng, [prompt_ids(llm, 64, salt=i) for i in range(batch)], params)
        for _ in range(5):
            eng.step()
        steps = []
        for _ in range(20):
            start()
            t0 = time.perf_counter()
            eng.step()
            steps.append((time.perf_counter() - t0, parts()))
        while eng.has_unfinished_requests():
            eng.step()
        steps.sort(key=lambda s: s[0])
        print(line(f"decode b{batch}", *steps[len(steps) // 2]))


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
