"""Weights read from their files in their stored dtype (kvserve/model/weights.py and its readers).

* A bf16 Hugging Face folder loads as bf16 (no float32 staging), bit-equal to what safetensors reads; the
  float32 engine on it gives transformers' float32 greedy tokens, the bfloat16 engine the same tokens as a
  float32 copy of the folder (the weights are the same bits either way), and the KV tiers' fingerprint is
  the value the float32-staging loader gave.
* GGUF tensors dequantized a band of rows at a time (q/k un-permuted per band of whole heads) equal the
  tensors read in one piece.
* Loading and building a model peaks at under 1.3x its weights (bench/load_memory.py in a subprocess).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.model import gguf_weights, load_model
from kvserve.model.fingerprint import model_fingerprint
from kvserve.model.weights import WeightFiles

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "1, 1, 2, 3, 5, 8, 13, 21, 34"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
TINY = dict(
    vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory, hf_tokenizer_dir):
    """A tiny random Llama saved by transformers in bfloat16 (weights scaled up: peaked next tokens)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    model = model.to(torch.bfloat16)
    out = tmp_path_factory.mktemp("llama_bf16")
    model.save_pretrained(out)
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return out, model


def test_bf16_folder_loads_as_stored(bf16_folder):
    path, _ = bf16_folder
    loaded = load_model(str(path))
    assert isinstance(loaded.weights, WeightFiles)
    stored = safetensors_torch.load_file(str(path / "model.safetensors"))
    assert set(loaded.weights) == set(stored)
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous(), name
        assert torch.equal(tensor, stored[name]), name
    # the fingerprint hashes float32 values: the same as the float32-staging loader's weights gave
    staged = {name: value.to(torch.float32) for name, value in stored.items()}
    assert model_fingerprint(loaded.config, loaded.weights) == model_fingerprint(loaded.config, staged)


def test_float32_engine_on_bf16_folder_equals_transformers(bf16_folder, hf_tokenizer):
    path, model = bf16_folder
    reference = model.to(torch.float32)  # bf16 -> float32 is exact: the same weights transformers runs
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        ids = torch.tensor([hf_tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = reference.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt


def test_bfloat16_engine_same_tokens_from_bf16_or_float32_files(bf16_folder, tmp_path):
    """bf16 files read straight into the engine's tensors give what float32 files of the same values give."""
    path, model = bf16_folder
    model.to(torch.float32).save_pretrained(tmp_path)
    shutil.copy(path / "tokenizer.json", tmp_path / "tokenizer.json")
    assert load_model(str(tmp_path)).weights["lm_head.weight"].dtype == torch.float32
    runs = []
    for folder in (path, tmp_path):
        llm = LLM(model=str(folder), dtype="bfloat16", num_kv_blocks=64, enable_prefix_caching=False)
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)])
    assert runs[0] == runs[1]


def test_gguf_bands_equal_whole_reads(ours, monkeypatch):
    """Dequantizing a few rows at a time (bands of whole heads for q/k) changes no value."""
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]  # fmt: skip
    whole = {name: ours.weights[name] for name in names}
    monkeypatch.setattr(gguf_weights, "_BAND_ELEMENTS", 4096)  # a band of 1-7 rows (heads of 64 rows)
    for name in names:
        assert torch.equal(ours.weights[name], whole[name]), name


@pytest.fixture(scope="module")
def load_memory(tmp_path_factory):
    """bench/load_memory.py as a module, and the bf16 folder it measures (~300 MiB: fixed costs such as
    oneDNN's first use stay small next to it; at a tenth of that they alone pass 1.3x in float32)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import load_memory
    finally:
        sys.path.remove(str(ROOT / "bench"))
    folder = tmp_path_factory.mktemp("llama_bf16_300mb")
    load_memory.build_bf16_folder(folder, hidden=1024, layers=8)
    return load_memory, folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_peak_memory_under_1_3x_weights(load_memory, dtype):
    """Peak RSS of load + build over the weights the model keeps, in a fresh process."""
    bench, folder = load_memory
    out = subprocess.run(
        [sys.executable, bench.__file__, "--measure", str(folder), dtype], check=True, capture_output=True, text=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["peak_ratio"] <= 1.3, row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_gguf_resident_within_1_2x_file(load_memory, dtype):
    """weights=auto keeps the bundled GGUF's Q4_1/Q8_0 tensors as stored: the built model's weights within 1.2x
    the file's tensor bytes (dequantized: 2.8x in bf16, 5.6x in float32)."""
    from kvserve.model import native

    if not native.kernel_linear_available(torch.device("cpu"), getattr(torch, dtype)):
        pytest.skip("the linear kernel does not run here: quantized weights are dequantized")
    bench, _ = load_memory
    out = subprocess.run(
        [sys.executable, bench.__file__, "--measure", "smollm2-135m", dtype, "auto"],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["quantized"] and row["resident_over_file"] <= 1.2, row
