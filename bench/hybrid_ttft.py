"""TTFT of a hybrid model with recurrent-state checkpoints: cold prompt, and a prompt sharing a long prefix.

    .venv/bin/python bench/make_hybrid.py            # once: bench/models/bamba-100m
    .venv/bin/python bench/hybrid_ttft.py [--model bench/models/bamba-100m] [--dtype float32]

For each checkpoint policy: TTFT of a cold 2,048-token prompt (the cost of cutting prefill chunks at the
checkpoints), then of a prompt that shares its first 2,000 tokens with it plus 48 new ones (resumes from the
deepest checkpoint at or below the 2,000-token KV hit; with `none` everything is recomputed), and the tokens
that resume skipped. Best of --repeats runs, each on a fresh engine.
"""

from __future__ import annotations

import argparse
import time

from kvserve import LLM, SamplingParams

POLICIES = ("none", "every-block:32", "every-block:8", "sqrt", "log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench/models/bamba-100m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    base = [(i * 7919) % 40000 + 100 for i in range(2048)]
    branch = base[:2000] + [(i * 104729) % 40000 + 100 for i in range(48)]
    print(f"{args.model} ({args.dtype}); block 16; 2,048-token prompt, then 2,000 shared + 48 new")
    print("| policy | cold TTFT (s) | warm TTFT (s) | tokens resumed |")
    print("|---|---|---|---|")
    for policy in POLICIES:
        cold = warm = float("inf")
        cached = 0
        for _ in range(args.repeats):
            llm = LLM(model=args.model, dtype=args.dtype, checkpoint_policy=policy, max_num_batched_tokens=2048)
            llm.generate(base[:64], one)  # warm-up (allocations, first calls)
            t = time.perf_counter()
            llm.generate(base, one)
            cold = min(cold, time.perf_counter() - t)
            t = time.perf_counter()
            out = llm.generate(branch, one)[0]
            warm = min(warm, time.perf_counter() - t)
            cached = out.num_cached_tokens
        print(f"| {policy} | {cold:.2f} | {warm:.2f} | {cached} |")


if __name__ == "__main__":
    main()
