"""The pieces the Llama-family variants (kvserve/model/family_config.py) add to the forward pass in
kvserve/model/llama.py, and which of them kvserve's C kernels do not implement.

Every op here is row-wise (one token's row never reads another's), so rows stay batch-invariant. Numerics
follow transformers' modeling code for the family where it differs from Llama's:
  * Gemma's RMSNorm normalises in float32, scales by (1 + weight) in float32 and rounds to the model dtype
    once (Llama's rounds before the weight; kvserve's torch op applies it before rounding for both);
  * Gemma scales the embeddings by sqrt(hidden_size) rounded to the model dtype, multiplied in that dtype;
  * soft-capping is cap * tanh(x / cap) in the dtype of x (float32 attention scores; the logits in the model
    dtype before they are returned as float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvserve.model.config import ModelConfig


def active_windows(config: ModelConfig, max_len: int) -> tuple[int | None, ...]:
    """Each layer's sliding window where it can hide a key (None elsewhere): a window of max_len keys or more
    never does (a query at position p sees keys p - window + 1 .. p, and p < max_len)."""
    windows = config.layer_windows or (None,) * config.num_hidden_layers
    return tuple(w if w is not None and w < max_len else None for w in windows)


def attention_kernel_gaps(config: ModelConfig, max_len: int) -> str | None:
    """What the native attention kernel (csrc/paged_attention.c) does not implement that this model needs,
    or None: such a model's attention runs on the torch path (kvserve/model/attention.py)."""
    gaps = []
    if any(w is not None for w in active_windows(config, max_len)):
        gaps.append("sliding-window attention")
    if config.attn_softcap is not None:
        gaps.append("attention logit soft-capping")
    return ", ".join(gaps) or None


def fused_layer_gaps(config: ModelConfig, max_len: int) -> str | None:
    """What the fused C layer (csrc/layer.c: Llama's RMSNorm, q/k/v bias, full RoPE, SwiGLU) does not
    implement that this model needs, or None. Such a model runs the layers op by op in llama.py."""
    gaps = [attention_kernel_gaps(config, max_len)]
    gaps.append("per-head q/k norms" if config.qk_norm else None)
    gaps.append("Gemma's norms and embedding scale" if config.gemma_norms else None)
    gaps.append(f"the {config.hidden_act} MLP" if config.hidden_act != "silu" else None)
    gaps.append("an o_proj bias" if config.o_proj_bias else None)
    gaps.append("partial rotary embeddings" if config.partial_rotary_factor != 1.0 else None)
    gaps.append("a query_pre_attn_scalar" if config.query_scale is not None else None)
    gaps.append("per-layer RoPE bases" if config.local_rope_theta is not None else None)
    gaps.append("final logit soft-capping" if config.final_softcap is not None else None)
    return ", ".join(g for g in gaps if g) or None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """RMSNorm over the last dim. gemma: weight is (1 + w) in float32 (norm_weight), x normalised and scaled in
    float32 and rounded once, as transformers' GemmaRMSNorm; else torch's fused op in x's dtype."""
    if gemma:
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps=eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


def norm_weight(weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    """A norm's stored weight (already in the model dtype) as rms_norm takes it: Gemma's 1 + w, in float32 as
    transformers computes it (1.0 + weight.float())."""
    return 1.0 + weight.float() if gemma else weight


def embed_scale(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Gemma's embedding multiplier: sqrt(hidden_size) as a float32 scalar rounded to the model dtype."""
    if not config.gemma_norms:
        return None
    return torch.tensor(config.hidden_size**0.5).to(device=device, dtype=dtype)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up: SwiGLU (silu) or Gemma's GELU with the tanh approximation."""
    if act == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x <- cap * tanh(x / cap), in place (the three steps and their roundings as transformers writes them)."""
    return x.div_(cap).tanh_().mul_(cap)
