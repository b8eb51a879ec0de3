"""Caching on vs off on unique prompts, offline (no server, no client): 16 requests of ~1,000 tokens, 32 output
tokens, 8 at a time, bf16; each configuration twice, alternating. Isolates the prefix cache's own cost."""

import sys
import time

from kvserve import LLM, SamplingParams
from kvserve.model.loader import load_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from offline import prompt_ids

loaded = load_model("smollm2-135m")
p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def run(caching, blocks=None):
    llm = LLM(loaded=loaded, dtype="bfloat16", enable_prefix_caching=caching, max_num_seqs=8, num_kv_blocks=blocks)
    prompts = [prompt_ids(llm, 1000, salt=100 + i) for i in range(16)]
    llm.generate([prompts[0][:50]], p)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, p)
    return time.perf_counter() - t


for rep in range(2):
    for caching, blocks in [(False, None), (True, None), (True, 1200)]:
        print(rep, "caching", caching, "blocks", blocks, f"{run(caching, blocks):.2f} s", flush=True)
