"""Caching on vs off on unique prompts, offline (no server, no client): 16 requests of ~1,000 tokens, 32 output
tokens, 8 at a time, bf16; each configuration twice, alternating. Isolates the prefix cache's own cost.

    .venv/bin/python bench/experiments/nosharing_offline.py [--repeats 2]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the sibling scripts

from offline import prompt_ids  # noqa: E402

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.model.loader import load_model  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def run(loaded, caching: bool, blocks: int | None = None) -> float:
    llm = LLM(loaded=loaded, dtype="bfloat16", enable_prefix_caching=caching, max_num_seqs=8, num_kv_blocks=blocks)
    prompts = [prompt_ids(llm, 1000, salt=100 + i) for i in range(16)]
    llm.generate([prompts[0][:50]], PARAMS)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, PARAMS)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="rounds, each running every configuration once")
    args = ap.parse_args()
    loaded = load_model("smollm2-135m")
    for rep in range(args.repeats):
        for caching, blocks in [(False, None), (True, None), (True, 1200)]:
            print(rep, "caching", caching, "blocks", blocks, f"{run(loaded, caching, blocks):.2f} s", flush=True)


if __name__ == "__main__":
    main()
