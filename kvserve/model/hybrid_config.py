"""ModelConfig of a Bamba (hybrid attention + Mamba-2) or a pure Mamba-2 model from its Hugging Face config.json."""

from __future__ import annotations

from typing import Any

from kvserve.model.config import (
    ATTENTION,
    DEFAULT_ROPE_THETA,
    MAMBA,
    MambaConfig,
    ModelConfig,
    hf_rope,
    optional_int,
)
from kvserve.model.gguf_metadata import token_id_tuple


def hybrid_from_hf(architecture: str, config: dict[str, Any]) -> ModelConfig:
    """Bamba (``BambaConfig``) or Mamba-2 (``Mamba2Config``) config.json -> ModelConfig."""
    hidden_size = int(config["hidden_size"])
    num_layers = int(config["num_hidden_layers"])
    limit = tuple(
        float(v["__float__"]) if isinstance(v, dict) else float(v)
        for v in config.get("time_step_limit") or (0.0, float("inf"))
    )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{architecture}: attention_bias / mlp_bias are not supported")
    if architecture == "bamba":
        heads = int(config["mamba_n_heads"])
        head_dim = config.get("mamba_d_head", "auto")
        mamba = MambaConfig(
            num_heads=heads,
            head_dim=int(config["mamba_expand"]) * hidden_size // heads if head_dim == "auto" else int(head_dim),
            num_groups=int(config.get("mamba_n_groups", 1)),
            state_size=int(config["mamba_d_state"]),
            conv_kernel=int(config.get("mamba_d_conv", 4)),
            chunk_size=int(config.get("mamba_chunk_size", 256)),
            conv_bias=bool(config.get("mamba_conv_bias", True)),
            proj_bias=bool(config.get("mamba_proj_bias", False)),
            time_step_limit=(limit[0], limit[1]),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        )
        attn = set(config.get("attn_layer_indices") or ())
        layer_types = tuple(ATTENTION if i in attn else MAMBA for i in range(num_layers))
        num_heads = int(config["num_attention_heads"])
        rope_theta, rope_scaling = hf_rope(config)
        rope_params = config.get("rope_parameters") or {}
        partial = float(rope_params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
        if rope_scaling is not None:
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "partial_rotary_factor"} or None
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
        return ModelConfig(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 262144)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=False,
            bos_token_id=optional_int(config.get("bos_token_id")),
            eos_token_ids=token_id_tuple(config.get("eos_token_id")),
            layer_types=layer_types,
            mamba=mamba,
            partial_rotary_factor=partial,
        )
    # mamba2: every layer a mixer, no MLP, no attention (the attention fields are placeholders).
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    mamba = MambaConfig(
        num_heads=int(config["num_heads"]),
        head_dim=int(config["head_dim"]),
        num_groups=int(config.get("n_groups", 1)),
        state_size=int(config["state_size"]),
        conv_kernel=int(config.get("conv_kernel", 4)),
        chunk_size=int(config.get("chunk_size", 256)),
        conv_bias=bool(config.get("use_conv_bias", True)),
        proj_bias=bool(config.get("use_bias", False)),
        time_step_limit=(limit[0], limit[1]),
        norm_eps=eps,
    )
    if mamba.intermediate_size != int(config.get("expand", 2)) * hidden_size:
        raise ValueError("mamba2: num_heads * head_dim must equal expand * hidden_size")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=0,
        num_hidden_layers=num_layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=1,
        rms_norm_eps=eps,
        rope_theta=DEFAULT_ROPE_THETA,
        rope_scaling=None,
        # Recurrent state has no length limit; this only bounds max_model_len.
        max_position_embeddings=int(config.get("max_position_embeddings", 1 << 20)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=False,
        bos_token_id=optional_int(config.get("bos_token_id")),
        eos_token_ids=token_id_tuple(config.get("eos_token_id")),
        layer_types=(MAMBA,) * num_layers,
        mamba=mamba,
        has_mlp=False,
        residual_in_fp32=bool(config.get("residual_in_fp32", True)),
    )
