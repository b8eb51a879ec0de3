"""How far bfloat16 greedy decoding follows float32, for each attention path (the kernel vs the torch path).

    .venv/bin/python bench/experiments/bf16_agreement.py [--max-tokens 32]

The reference is kvserve in float32 (itself token-equal to transformers in float32, tests/model/test_golden.py).
For the golden test's prompts plus three questions about its document, it counts the bf16 tokens generated
before the first divergence from float32, with KVSERVE_ATTENTION=torch and with the kernel. bf16 greedy
decoding flips near-ties, so neither path follows float32 everywhere; the point is that the kernel (float32
scores from exact bf16 products on AVX512-BF16 CPUs) is no worse than the torch path.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the sibling scripts

from golden_inputs import DOC, PROMPTS  # noqa: E402

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.model import native  # noqa: E402
from kvserve.model.loader import load_model  # noqa: E402

QUESTIONS = ("What does the pool evict first?", "When is a block never evicted?", "How long is a block?")


def agreeing(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    loaded = load_model("smollm2-135m")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [DOC + f"\nQ: {q}\nA:" for q in QUESTIONS] + PROMPTS
    ref = LLM(loaded=loaded, dtype="float32", enable_prefix_caching=False, num_kv_blocks=512).generate(prompts, params)
    for mode in ("torch", "native"):
        os.environ["KVSERVE_ATTENTION"] = mode
        native.load.cache_clear()
        llm = LLM(loaded=loaded, dtype="bfloat16", enable_prefix_caching=False, num_kv_blocks=512)
        if mode == "native" and not llm.engine.backends.native_attention:
            print("native: the kernel does not build here")
            continue
        out = llm.generate(prompts, params)
        counts = [agreeing(o.outputs[0].token_ids, r.outputs[0].token_ids) for o, r in zip(out, ref)]
        print(f"{mode:6s}: {sum(counts)} of {args.max_tokens * len(prompts)} tokens before divergence; {counts}")


if __name__ == "__main__":
    main()
