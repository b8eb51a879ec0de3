"""The cost of structured outputs: decode step time with and without a JSON schema, and compile time.

    .venv/bin/python bench/structured.py [--dtype bfloat16] [--steps 24] [--rounds 3]

Offline engine, the bundled model. Decode steps (prefill excluded) at batch 1 free / constrained, and at batch
32 with 0, 4 and 32 rows constrained by a JSON schema; the median step of each, the settings alternating
round by round against drift. Then the first compilation of a schema (the vocabulary's llguidance tokenizer
included when it is the engine's first) against a cached one. Writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from kvserve import LLM, SamplingParams
from kvserve.engine import NewRequest
from kvserve.model.loader import load_model
from kvserve.sampling_params import StructuredOutputsParams

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}}}},
        "notes": {"type": "string"},
    },
    "required": ["name", "items", "notes"],
}


def median_step(llm: LLM, batch: int, constrained: int, steps: int) -> float:
    eng = llm.engine
    free = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    spec = StructuredOutputsParams(json=SCHEMA)
    tight = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True, structured_outputs=spec)
    ids = eng.add_requests(
        [NewRequest(f"Record {i} as JSON:", tight if i < constrained else free) for i in range(batch)]
    )
    waiting = set(ids)
    while waiting:  # prefill every request first
        waiting -= {o.request_id for o in eng.step() if o.outputs[0].token_ids or o.finished}
    times = []
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        out = eng.step()
        if len(out) == batch:  # a full decode step
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    loaded = load_model("smollm2-135m")
    llm = LLM(loaded=loaded, dtype=args.dtype, max_num_seqs=64, enable_prefix_caching=False)
    t0 = time.perf_counter()
    llm.engine._structured.compiler.compile(StructuredOutputsParams(json=SCHEMA))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.engine._structured.compiler.compile(StructuredOutputsParams(json=dict(SCHEMA)))
    cached = time.perf_counter() - t0
    other = {"type": "object", "properties": {"x": {"type": "number"}}}
    t0 = time.perf_counter()
    llm.engine._structured.compiler.compile(StructuredOutputsParams(json=other))
    new_schema = time.perf_counter() - t0
    cases = [(1, 0), (1, 1), (32, 0), (32, 4), (32, 32)]
    rounds: dict[str, list[float]] = {f"b{b}-c{c}": [] for b, c in cases}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for b, c in cases:
            rounds[f"b{b}-c{c}"].append(median_step(llm, b, c, args.steps))
    step = {k: statistics.median(v) * 1e3 for k, v in rounds.items()}
    overhead = {
        "batch 1, constrained": step["b1-c1"] / step["b1-c0"] - 1,
        "batch 32, 4 constrained": step["b32-c4"] / step["b32-c0"] - 1,
        "batch 32, all constrained": step["b32-c32"] / step["b32-c0"] - 1,
    }
    result = {
        "dtype": args.dtype,
        "step_ms": step,
        "overhead": overhead,
        "compile_ms": {
            "first (tokenizer included)": first * 1e3,
            "cached": cached * 1e3,
            "new schema": new_schema * 1e3,
        },
        "rounds_ms": {k: [x * 1e3 for x in v] for k, v in rounds.items()},
    }
    print(json.dumps({k: result[k] for k in ("step_ms", "overhead", "compile_ms")}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
