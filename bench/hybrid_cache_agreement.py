"""Do cached runs of a hybrid model give the tokens of uncached ones? Per dtype, greedy and seeded sampling.

    .venv/bin/python bench/make_hybrid.py                 # once: bench/models/bamba-100m
    .venv/bin/python bench/hybrid_cache_agreement.py [--model bench/models/bamba-100m] [--prompts 12]

A hybrid model's recurrent layers resume from checkpoints, and the SSD's float sums depend on where prefill
chunks start (README, Exactness), so a cached run is equal to an uncached one only up to rounding; greedy or
seeded choices can flip at near-ties. This counts how often that happens. Prompts come in families sharing
random-length prefixes (as tests/model/test_hybrid.py builds them, at this model's scale). Each prompt runs
alone on an engine with caching off (the reference) and, one after another so later prompts resume from
earlier ones' checkpoints, on an engine with --checkpoint-policy. For each run it reports the tokens resumed,
the prompts whose output equals the reference, the tokens generated before the first divergence, and the
largest difference of the chosen tokens' logprobs over the positions before it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.model.loader import load_model  # noqa: E402


def family_prompts(seed: int, n: int, vocab: int, root_tokens: int) -> list[list[int]]:
    """n prompts, each a random-length prefix of one of two roots plus 8-64 tokens of its own."""
    rng = random.Random(seed)
    roots = [[rng.randrange(100, vocab) for _ in range(root_tokens)] for _ in range(2)]
    out = []
    for _ in range(n):
        root = rng.choice(roots)
        keep = rng.randrange(root_tokens // 4, root_tokens + 1)
        out.append(root[:keep] + [rng.randrange(100, vocab) for _ in range(rng.randrange(8, 65))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench/models/bamba-100m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--policies", nargs="+", default=["every-block:8", "optimal:4"])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--root-tokens", type=int, default=768)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=512, help="max_num_batched_tokens (prefill chunk budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = family_prompts(args.seed, args.prompts, loaded.config.vocab_size, args.root_tokens)
    samplings = {
        "greedy": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0),
        "seeded top-p": SamplingParams(
            temperature=1.0, top_p=0.9, seed=1, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0
        ),
    }
    common = dict(loaded=loaded, block_size=16, max_num_batched_tokens=args.chunk_tokens, max_num_seqs=4)
    rows = []
    t0 = time.perf_counter()
    runs = len(args.dtypes) * len(samplings) * (1 + len(args.policies))  # the reference, then each policy
    with tqdm(total=runs * len(prompts), desc="generate", unit="req") as bar:
        for dtype in args.dtypes:
            for name, params in samplings.items():
                plain = LLM(model=args.model, dtype=dtype, enable_prefix_caching=False, **common)
                reference = []
                for p in prompts:
                    reference.append(plain.generate(p, params)[0])
                    bar.update(1)
                for policy in args.policies:
                    llm = LLM(model=args.model, dtype=dtype, checkpoint_policy=policy, **common)
                    resumed = equal = agree = 0
                    worst = 0.0
                    for p, ref in zip(prompts, reference):
                        out = llm.generate(p, params)[0]
                        bar.update(1)
                        resumed += out.num_cached_tokens
                        a, b = out.outputs[0], ref.outputs[0]
                        k = len(os.path.commonprefix([a.token_ids, b.token_ids]))  # tokens before the first divergence
                        equal += k == len(b.token_ids)
                        agree += k
                        if k:
                            diff = torch.tensor(a.logprobs[:k]) - torch.tensor(b.logprobs[:k])
                            worst = max(worst, diff.abs().max().item())
                    rows.append((dtype, name, policy, resumed, equal, agree, worst))
    n, total = len(prompts), len(prompts) * args.max_tokens
    lens = [len(p) for p in prompts]
    print(
        f"{args.model}: {n} prompts of {min(lens)}-{max(lens)} tokens in 2 families, {args.max_tokens} tokens "
        f"each, block 16, chunk budget {args.chunk_tokens}, {args.threads} threads, {time.perf_counter() - t0:.0f} s"
    )
    print(
        "| dtype | sampling | policy | tokens resumed | outputs equal | tokens before first divergence | "
        "max logprob diff before it |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype, name, policy, resumed, equal, agree, worst in rows:
        print(f"| {dtype} | {name} | {policy} | {resumed:,} | {equal}/{n} | {agree}/{total} | {worst:.1e} |")


if __name__ == "__main__":
    main()
