"""Peak memory while loading a model, against the weights it keeps: does loading stage copies?

    .venv/bin/python bench/load_memory.py [--hidden 1024 --layers 8] [--out bench/results/load_memory.json]

Each case runs in a fresh subprocess (``--measure MODEL DTYPE``) that imports kvserve, notes its resident
memory, resets the high-water mark (``/proc/self/clear_refs``), then does what an engine does at start:
``load_model`` and ``build_parts`` (weights converted to the engine dtype, q/k/v and gate/up fused, linears
packed) with a one-block KV pool. Reported per case:

* ``param_mb``: the model's parameters times the engine dtype's size (each tensor once; tied lm_head once);
* ``resident_mb``: the weight tensors the built model keeps (``param_mb`` plus the packed copy of a tied
  lm_head where linears are prepacked, e.g. oneDNN in float32);
* ``peak_mb``: peak RSS during load + build minus the RSS before it (``VmHWM``; file pages mapped by the
  process count, the kernel's page cache does not);
* ``after_mb``: RSS once built, minus the same baseline (the weights, the tokenizer, allocator slack);
* ``peak_ratio``: peak_mb / resident_mb, the number the loader is held to (<= 1.3).

* ``file_mb`` and ``resident_over_file`` (GGUF): the file's tensor bytes, and what the built model keeps
  against them; with ``--weights auto`` (quantized weights kept as stored) the issue holds it to <= 1.2.

Cases: the bundled GGUF (``smollm2-135m``: Q4_1 layers, a Q8_0 embedding tied as lm_head) with its quantized
weights kept as stored (``weights auto``) and dequantized at load (``dequantize``), and a random Llama saved
by transformers in bfloat16 (a Hugging Face folder, built in a temporary directory), each in float32 and
bfloat16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed (then the peak includes imports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _param_count(config) -> int:
    """Parameters of a Llama-family config, each tensor once (the lm_head only when untied)."""
    c = config
    d, hd = c.hidden_size, c.head_dim
    attn = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    bias = hd * (c.num_attention_heads + 2 * c.num_key_value_heads) if c.attention_bias else 0
    layer = attn + bias + 3 * d * c.intermediate_size + 2 * d
    embed = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * layer + embed + d


def _resident_bytes(model) -> int:
    """Bytes of the weight tensors a built Llama model holds (each object once; packed kernel weights too)."""
    seen, total = set(), 0
    owners = [model, *model.layers]
    for owner in owners:
        for name, value in vars(owner).items():
            if name in ("cos", "sin", "_layer_ptrs") or id(value) in seen:
                continue
            seen.add(id(value))
            tensor = getattr(value, "packed", value)  # native.PackedLinear keeps its panels in .packed
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _file_tensor_bytes(model: str) -> int | None:
    """Bytes of a GGUF file's tensors (None for a folder)."""
    from kvserve.model.loader import resolve_model_path

    path = resolve_model_path(model)
    if not path.is_file():
        return None
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def measure(model: str, dtype: str, weights: str = "auto") -> dict:
    """Load and build ``model`` in ``dtype`` in this process; memory figures in MiB."""
    import time

    from kvserve.builder import build_parts
    from kvserve.config import EngineConfig
    from kvserve.model.loader import load_model

    base_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    loaded = load_model(model)
    config = EngineConfig(model=model, dtype=dtype, weights=weights, num_kv_blocks=1, max_model_len=256)
    parts = build_parts(config, loaded)
    seconds = time.perf_counter() - start
    peak_kb, after_kb = _status_kb("VmHWM"), _status_kb("VmRSS")
    param_mb = _param_count(loaded.config) * _DTYPE_BYTES[dtype] / (1 << 20)
    resident_mb = _resident_bytes(parts.model) / (1 << 20)
    peak_mb = (peak_kb - base_kb) / 1024
    file_bytes = _file_tensor_bytes(model)
    return {
        "model": model,
        "dtype": dtype,
        "weights": weights,
        "quantized": bool(getattr(parts.model, "quantized", False)),
        "file_mb": None if file_bytes is None else round(file_bytes / (1 << 20), 1),
        "resident_over_file": None if file_bytes is None else round(resident_mb * (1 << 20) / file_bytes, 3),
        "param_mb": round(param_mb, 1),
        "resident_mb": round(resident_mb, 1),
        "peak_mb": round(peak_mb, 1),
        "after_mb": round((after_kb - base_kb) / 1024, 1),
        "peak_ratio": round(peak_mb / resident_mb, 3),
        "peak_over_params": round(peak_mb / param_mb, 3),
        "baseline_mb": round(base_kb / 1024, 1),
        "peak_reset": reset,
        "seconds": round(seconds, 2),
    }


def build_bf16_folder(out: Path, hidden: int, layers: int) -> None:
    """A random-weight Llama saved by transformers in bfloat16 (with the bundled tokenizer's tokenizer.json)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    # any tokenizer.json does: the bench never encodes text
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer())
    tokenizer.save_pretrained(out)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))


def _run_case(model: str, dtype: str, weights: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", model, dtype, weights], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", metavar="MODEL DTYPE [WEIGHTS]", help="internal: one case")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.measure:
        if len(args.measure) not in (2, 3):
            parser.error("--measure takes MODEL DTYPE [WEIGHTS]")
        print(json.dumps(measure(*args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"llama-h{args.hidden}-l{args.layers}-bf16"
        build_bf16_folder(folder, args.hidden, args.layers)
        cases = [("smollm2-135m", w) for w in ("auto", "dequantize")] + [(str(folder), "auto")]
        for model, weights in cases:
            for dtype in ("float32", "bfloat16"):
                row = _run_case(model, dtype, weights)
                row["model"] = Path(model).name
                rows.append(row)
    head = ("model", "dtype", "weights", "file MiB", "resident MiB", "res/file", "peak MiB", "peak/res", "s")
    print("{:<24} {:<9} {:<12} {:>8} {:>12} {:>8} {:>9} {:>9} {:>6}".format(*head))
    for r in rows:
        file_mb = "-" if r["file_mb"] is None else f"{r['file_mb']:.1f}"
        ratio = "-" if r["resident_over_file"] is None else f"{r['resident_over_file']:.2f}"
        weights = r["weights"] + ("" if r["quantized"] or r["file_mb"] is None else "*")
        print(
            f"{r['model']:<24} {r['dtype']:<9} {weights:<12} {file_mb:>8} {r['resident_mb']:>12.1f} {ratio:>8} "
            f"{r['peak_mb']:>9.1f} {r['peak_ratio']:>9.2f} {r['seconds']:>6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
