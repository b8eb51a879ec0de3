"""The batch-1 decode step's own overhead: everything but the model's arithmetic, measured by stubbing it out.

    .venv/bin/python bench/experiments/step_overhead.py [--dtype bfloat16] [--steps 64] [--rounds 5]

A batch-1 step is the fused layers (one C call), the lm_head and everything around them: scheduling, block
tables, the runner's tensors, the embedding, the final norm, sampling, detokenisation and the engine's
bookkeeping. This script runs real batch-1 decode steps twice: as they are, and with the layers' C call made a
no-op and the lm_head answering with logits it computed once. The second is the step's overhead with its
data in cache; in a real step the weight stream (270 MB bf16) has just evicted that data, so the overhead
inside a real step is larger (bench/offline.py reports the time outside model.forward there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the sibling scripts

from offline import bench_decode  # noqa: E402

from kvserve import LLM  # noqa: E402
from kvserve.model import native  # noqa: E402
from kvserve.model.loader import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    llm = LLM(loaded=load_model("smollm2-135m"), dtype=args.dtype, max_num_seqs=64, enable_prefix_caching=False)
    if not llm.engine._runner.model.fused:
        raise SystemExit("needs the fused CPU layer (a C compiler)")
    bench_decode(llm, 1, 8)
    real = [bench_decode(llm, 1, args.steps)["step_ms"] for _ in range(args.rounds)]

    lib, lm_head = native.load(), llm.engine._runner.model.lm_head
    cached: dict[int, object] = {}
    call = native.PackedLinear.__call__

    class NoLayers:
        def __getattr__(self, name):
            return (lambda *a: 0) if name == "kvserve_llama_layers" else getattr(lib, name)

    def stub(self, x, bias=None, residual=None):
        if self is not lm_head:
            return call(self, x, bias, residual)
        if x.shape[0] not in cached:
            cached[x.shape[0]] = call(self, x, bias, residual)
        return cached[x.shape[0]].clone()

    stubbed_lib = NoLayers()
    native.load = lambda: stubbed_lib
    native.PackedLinear.__call__ = stub
    bench_decode(llm, 1, 8)
    bare = [bench_decode(llm, 1, args.steps)["step_ms"] for _ in range(args.rounds)]
    print(f"{args.dtype} batch-1 decode step, median of {args.rounds} rounds of {args.steps} steps:")
    print(f"  real step                          {statistics.median(real):7.3f} ms")
    print(f"  without the layers and the lm_head {statistics.median(bare):7.3f} ms (the overhead, data in cache)")


if __name__ == "__main__":
    main()
