"""The bundled model's linear layers on F.linear (MKL / oneDNN as torch picks) vs oneDNN's inner product.

Four columns: F.linear on plain weights, oneDNN's inner product on plain weights, oneDNN on weights
prepacked in its blocked layout (kvserve's fallback), and kvserve's own kernel on its packed panels
(kvserve/model/csrc/linear.c; what kvserve runs where it builds, kvserve/model/invariant.py).

    .venv/bin/python bench/experiments/gemm_backends.py [--rows 1 2 4 32 512 2048]
        [--out bench/experiments/results/gemm_backends.json]

For each dtype and row count: the time of all 30 layers' fused weights (qkv, o_proj, gate_up, down) and,
up to 32 rows, the tied lm_head, best of several runs, and the weight bytes read per second. Weights are
random with the model's shapes (speed does not depend on the values). This is what chose kvserve's CPU
linear backend (kvserve/model/invariant.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvserve.model import native
from kvserve.model.invariant import prepack_linear_weight
from kvserve.model.loader import load_model


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def kernel(x: torch.Tensor, w: native.PackedLinear) -> torch.Tensor:
    return w(x)


def timed_pass(fn, layers: list[list[torch.Tensor]], head: torch.Tensor | None, xs: dict[int, torch.Tensor]) -> float:
    """Seconds for one pass of fn over every layer weight (and the lm_head when given)."""
    t0 = time.perf_counter()
    for ws in layers:
        for w in ws:
            fn(xs[w.shape[1]], w)  # a prepacked weight reports its plain (out, in) shape
    if head is not None:
        fn(xs[head.shape[1]], head)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 32, 512, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gemm_backends.json"))
    args = ap.parse_args()
    cfg = load_model("smollm2-135m").config
    D, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = [((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd, D), (D, D), (2 * inter, D), (D, inter)]
    results = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        layers = [[torch.randn(o, i).to(dtype) for o, i in shapes] for _ in range(cfg.num_hidden_layers)]
        head = torch.randn(cfg.vocab_size, D).to(dtype)
        packed_layers = [[prepack_linear_weight(w) for w in ws] for ws in layers]
        packed_head = prepack_linear_weight(head)
        use_kernel = native.linear_enabled(torch.device("cpu"), dtype)
        if use_kernel:
            kernel_layers = [[native.PackedLinear(w) for w in ws] for ws in layers]
            kernel_head = native.PackedLinear(head)
        for m in tqdm(args.rows, desc=name):
            xs = {D: torch.randn(m, D).to(dtype), inter: torch.randn(m, inter).to(dtype)}
            with_head = m <= 32
            nbytes = sum(w.numel() for ws in layers for w in ws) + (head.numel() if with_head else 0)
            nbytes *= head.element_size()
            row = {"dtype": name, "rows": m, "lm_head": with_head, "weight_bytes": nbytes}
            runs = (("f_linear", F.linear, layers, head), ("onednn", onednn, layers, head))
            runs += (("prepacked", onednn, packed_layers, packed_head),)
            if use_kernel:
                runs += (("kernel", kernel, kernel_layers, kernel_head),)
            for label, fn, ws_, head_ in runs:
                args_ = (fn, ws_, head_ if with_head else None, xs)
                timed_pass(*args_)
                best = min(timed_pass(*args_) for _ in range(3 if m >= 512 else 7))
                row[f"{label}_ms"] = best * 1e3
                row[f"{label}_gbs"] = nbytes / best / 1e9
            row["speedup"] = row["f_linear_ms"] / row["onednn_ms"]
            row["speedup_prepacked"] = row["f_linear_ms"] / row["prepacked_ms"]
            results.append(row)
            print(
                f"{name:9s} rows {m:5d}: F.linear {row['f_linear_ms']:8.2f} ms  oneDNN {row['onednn_ms']:8.2f} ms"
                f"  prepacked {row['prepacked_ms']:8.2f} ms ({row['speedup_prepacked']:.2f}x F.linear)"
                + (f"  kernel {row['kernel_ms']:8.2f} ms ({row['kernel_gbs']:.1f} GB/s)" if use_kernel else "")
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
