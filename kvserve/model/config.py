"""Model hyper-parameters, read from a Hugging Face ``config.json`` or from GGUF metadata.

:class:`ModelConfig` is the one description of a decoder-only transformer that the rest of
kvserve uses (engine, KV cache sizing, sampling stop ids). Accepted: the Llama family (``llama``,
``mistral``, ``qwen2`` = Llama with q/k/v bias, ``qwen3``, ``gemma2``, ``gemma3_text``, ``phi3``: what each
changes is a field below, read from config.json by kvserve/model/family_config.py) and two Mamba-2
families: ``bamba`` (a hybrid whose layers are either attention or a Mamba-2 mixer, each followed by a SwiGLU
MLP) and ``mamba2`` (pure recurrent: every layer is a Mamba-2 mixer, no MLP). For those, ``layer_types`` names
each layer's mixer and ``mamba`` holds the mixer's shape; the attention fields describe the attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvserve.model.gguf_metadata import (
    GGUFMetadata,
    gguf_eos_token_ids,
    gguf_rope_scaling,
    gguf_vocab_size,
)

LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (*LLAMA_FAMILY, "bamba", "mamba2")
HYBRID_ARCHITECTURES: tuple[str, ...] = ("bamba", "mamba2")
ATTENTION, MAMBA = "attention", "mamba"  # layer_types entries

# GGUF `general.architecture` -> our architecture name.
_GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}

DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class MambaConfig:
    """Shape of one Mamba-2 mixer (the same for every recurrent layer of a model)."""

    num_heads: int  # H
    head_dim: int  # P; H * P = intermediate_size = expand * hidden_size
    num_groups: int  # G: B and C are shared by H / G heads each
    state_size: int  # N
    conv_kernel: int  # K: causal depthwise conv width; the conv state keeps the last K - 1 inputs
    chunk_size: int  # SSD chunk length used for prefill
    conv_bias: bool
    proj_bias: bool
    time_step_limit: tuple[float, float]
    norm_eps: float

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: x (H * P) plus B and C (G * N each)."""
        return self.intermediate_size + 2 * self.num_groups * self.state_size


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a causal language model (Llama family, or a Mamba-2 hybrid / recurrent one)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Hybrid / recurrent models only (empty / None / defaults for the Llama family).
    layer_types: tuple[str, ...] = ()  # ATTENTION or MAMBA per layer; () = every layer is attention
    mamba: MambaConfig | None = None
    partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Bamba: 0.5)
    has_mlp: bool = True  # False for mamba2 (mixer only)
    residual_in_fp32: bool = False  # mamba2: the residual stream is float32 whatever the model dtype
    # Llama-family variants (defaults: Llama). kvserve/model/families.py says which of them the C kernels run.
    o_proj_bias: bool = False  # transformers' attention_bias for Llama, Qwen3, Gemma (not Qwen2's q/k/v-only)
    hidden_act: str = "silu"  # the gated MLP's activation: silu or gelu_pytorch_tanh (Gemma)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    gemma_norms: bool = False  # Gemma: norms scale by (1 + weight) in float32, four per layer (pre and post
    # attention and MLP), embeddings times sqrt(hidden_size)
    query_scale: float | None = None  # attention scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: float | None = None  # the same on the logits
    layer_windows: tuple[int | None, ...] = ()  # sliding window (keys a query sees) per layer, None = full;
    # () = no window anywhere
    local_rope_theta: float | None = None  # RoPE base of the sliding-window layers, unscaled (Gemma 3)

    @property
    def is_hybrid(self) -> bool:
        """True when some layer is recurrent (a Mamba-2 mixer)."""
        return MAMBA in self.layer_types

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.layer_types or self.layer_types[i] == ATTENTION]

    @property
    def recurrent_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == MAMBA]

    @property
    def num_attention_layers(self) -> int:
        """Layers with a KV cache (all of them for the Llama family, none for mamba2)."""
        return len(self.attention_layers)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported_message(self.architecture, SUPPORTED_ARCHITECTURES))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a parsed Hugging Face ``config.json`` (transformers 4.x or 5.x layout)."""
        architecture = _hf_architecture(config)
        if architecture in HYBRID_ARCHITECTURES:
            from kvserve.model.hybrid_config import hybrid_from_hf  # it builds this class

            return hybrid_from_hf(architecture, config)
        from kvserve.model.family_config import llama_family_from_hf  # it builds this class

        return llama_family_from_hf(architecture, config)

    @classmethod
    def from_gguf(cls, reader: Any) -> ModelConfig:
        """Build from the metadata and tensor table of a ``gguf.GGUFReader``."""
        meta = GGUFMetadata(reader)
        gguf_arch = str(meta.get("general.architecture"))
        if gguf_arch not in _GGUF_ARCHITECTURES:
            raise ValueError(_unsupported_message(gguf_arch, tuple(_GGUF_ARCHITECTURES)))
        tensor_names = {tensor.name for tensor in reader.tensors}
        arch = gguf_arch
        hidden_size = int(meta.require(f"{arch}.embedding_length"))
        num_heads = int(meta.require(f"{arch}.attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden_size // num_heads))
        _check_full_rotary(meta.get(f"{arch}.rope.dimension_count"), head_dim)
        if "rope_freqs.weight" in tensor_names:
            raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1-style rope scaling) are not supported")
        return cls(
            architecture=_GGUF_ARCHITECTURES[gguf_arch],
            vocab_size=gguf_vocab_size(meta, arch),
            hidden_size=hidden_size,
            intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(meta.require(f"{arch}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", DEFAULT_ROPE_THETA)),
            rope_scaling=gguf_rope_scaling(meta, arch),
            max_position_embeddings=int(meta.require(f"{arch}.context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=gguf_arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
            bos_token_id=optional_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_ids=gguf_eos_token_ids(meta),
        )


def _unsupported_message(architecture: str, supported: tuple[str, ...]) -> str:
    return f"unsupported model architecture {architecture!r}; supported: {', '.join(supported)}"


def optional_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _hf_architecture(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no 'model_type'; cannot tell the model architecture")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(_unsupported_message(str(model_type), SUPPORTED_ARCHITECTURES))
    return str(model_type)


def hf_rope(config: dict[str, Any], default_theta: float = DEFAULT_ROPE_THETA) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either the 4.x keys or 5.x ``rope_parameters`` (its
    ``partial_rotary_factor`` is not scaling: the caller reads it)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            return float(theta), None
        return float(theta), scaling
    scaling = config.get("rope_scaling")
    return float(config.get("rope_theta", default_theta)), dict(scaling) if scaling else None


def _check_full_rotary(rope_dims: Any, head_dim: int) -> None:
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(
            f"partial rotary embeddings (rope.dimension_count={rope_dims}, head_dim={head_dim}) are not supported"
        )
