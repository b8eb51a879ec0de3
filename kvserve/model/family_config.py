"""ModelConfig of a Llama-family model from its Hugging Face config.json (transformers 4.x or 5.x layout).

Families and what each changes in the Llama forward pass (kvserve/model/llama.py):
  llama     RoPE scaling (linear, llama3, yarn); attention_bias adds q/k/v and o_proj biases
  mistral   a sliding window on every layer when `sliding_window` is set
  qwen2     q/k/v biases; windows on layers >= max_window_layers (or per `layer_types`) when use_sliding_window
  qwen3     per-head RMSNorm of q and k before RoPE; attention_bias as llama; windows as qwen2
  gemma2    (1 + weight) norms, four per layer; embeddings * sqrt(hidden); GELU-tanh MLP; query_pre_attn_scalar;
            attention and final logit soft-capping; a window on every other layer
  gemma3_text  gemma2's layer plus q/k norms; local (windowed) layers with their own RoPE base
  phi3      fused qkv_proj / gate_up_proj (split by the loader); partial rotary; a window on every layer when set
Defaults are transformers' for the family where config.json leaves a key out. What is refused says why.
"""

from __future__ import annotations

from typing import Any

from kvserve.model.config import ModelConfig, hf_rope, optional_int
from kvserve.model.gguf_metadata import token_id_tuple
from kvserve.model.rope import rope_type

GATED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's act(gate) * up; "swish" is silu
GEMMA = ("gemma2", "gemma3_text")
QWEN = ("qwen2", "qwen3")
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types entries


def llama_family_from_hf(architecture: str, config: dict[str, Any]) -> ModelConfig:
    """config.json of a Llama-family model -> ModelConfig; ValueError naming what is not supported."""
    gemma = architecture in GEMMA
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported (no bias on gate/up/down projections)")
    act = (config.get("hidden_activation") if gemma else None) or config.get("hidden_act")
    act = act or ("gelu_pytorch_tanh" if gemma else "silu")
    act = "silu" if act == "swish" else act
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported: the gated MLP runs {' or '.join(GATED_ACTIVATIONS)}")
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"{architecture}: use_bidirectional_attention=True is not supported (causal attention only)")
    hidden_size = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    default_head_dim = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}.get(architecture, hidden_size // num_heads)
    head_dim = int(config.get("head_dim") or default_head_dim)
    local_theta = None
    if architecture == "gemma3_text":
        rope_theta, rope_scaling, local_theta = _gemma3_rope(config)
    else:
        rope_theta, rope_scaling = hf_rope(config)
    rope_type(rope_scaling)  # refuses what rope.py does not implement (Phi-3's longrope / su) here, by name
    partial = 1.0
    if architecture == "phi3":
        params = config.get("rope_parameters") or {}
        partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        if int(head_dim * partial) % 2:
            raise ValueError(f"phi3: a rotary width of {head_dim * partial} (head_dim * partial_rotary_factor) is odd")
    bias = bool(config.get("attention_bias", False)) and architecture not in ("mistral", "phi3")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        attention_bias=architecture == "qwen2" or bias,  # Qwen2's q/k/v always have biases (o_proj never)
        o_proj_bias=bias,  # transformers gives o_proj a bias with attention_bias (Llama, Qwen3, Gemma)
        bos_token_id=optional_int(config.get("bos_token_id")),
        eos_token_ids=token_id_tuple(config.get("eos_token_id")),
        partial_rotary_factor=partial,
        hidden_act=act,
        qk_norm=architecture in ("qwen3", "gemma3_text"),
        gemma_norms=gemma,
        query_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
        attn_softcap=_softcap(config, "attn_logit_softcapping", 50.0 if architecture == "gemma2" else None),
        final_softcap=_softcap(config, "final_logit_softcapping", 30.0 if architecture == "gemma2" else None),
        layer_windows=hf_layer_windows(architecture, config),
        local_rope_theta=local_theta,
    )


def hf_layer_windows(architecture: str, config: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers assigns them; () when none has one."""
    window = config.get("sliding_window")
    if architecture in QWEN and not config.get("use_sliding_window"):
        window = None  # transformers drops the window unless use_sliding_window
    if window is None or architecture == "llama":  # LlamaConfig has no window
        return ()
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if architecture in ("mistral", "phi3"):  # one window for every layer (Mistral ignores layer_types)
        sliding = [True] * n
    elif types is not None:
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown or len(types) != n:
            raise ValueError(f"{architecture}: layer_types {unknown or types} not supported ({FULL}, {SLIDING})")
        sliding = [t == SLIDING for t in types]
    elif architecture in QWEN:
        sliding = [i >= int(config.get("max_window_layers", 28)) for i in range(n)]
    elif architecture == "gemma2":
        sliding = [i % 2 == 0 for i in range(n)]
    else:  # gemma3_text: every sliding_window_pattern-th layer is global
        pattern = int(config.get("sliding_window_pattern", 6))
        sliding = [(i + 1) % pattern != 0 for i in range(n)]
    if not any(sliding):
        return ()
    if int(window) < 1:
        raise ValueError(f"{architecture}: sliding_window={window} must be at least 1")
    return tuple(int(window) if s else None for s in sliding)


def _gemma3_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(global theta, global scaling, local theta): 5.x nests rope_parameters by layer type, 4.x has
    rope_theta / rope_scaling for the global layers and rope_local_base_freq for the local ones."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        theta, scaling = hf_rope({"rope_parameters": params[FULL] or {}}, 1_000_000.0)
        local_theta, local_scaling = hf_rope({"rope_parameters": params.get(SLIDING) or {}}, 10_000.0)
    else:
        theta, scaling = hf_rope(config, 1_000_000.0)
        local_theta, local_scaling = float(config.get("rope_local_base_freq", 10_000.0)), None
    if local_scaling is not None:
        raise ValueError(f"gemma3_text: RoPE scaling on the sliding-window layers ({local_scaling}) is not supported")
    return theta, scaling, local_theta


def _softcap(config: dict[str, Any], key: str, default: float | None) -> float | None:
    value = config.get(key, default)
    return None if value is None else float(value)
