"""Forward pass of Mamba-2 hybrid and recurrent models (Bamba, Mamba2ForCausalLM) over a flat batch.

Each layer is   x = x + mixer(RMSNorm(x));   x = x + MLP(RMSNorm(x))   (no MLP for mamba2)
where the mixer is either paged attention (GQA, RoPE on the first partial_rotary_factor of each head, KV in the
engine's paged cache exactly as for Llama) or a Mamba-2 mixer (kvserve/model/mamba2.py) whose per-sequence
conv and SSM states live in a state pool (kvserve/recurrent/state_pool.py).

The model holds no state: forward() reads each sequence's recurrent state from the pool (never writes it) and
returns the states after the step; the runner commits them once the whole step has succeeded, so a failed
step leaves every sequence where it was. Weight names follow transformers' BambaForCausalLM and
Mamba2ForCausalLM; numerics follow their pure-torch paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.model.attention import AttentionMetadata, paged_attention, write_kv
from kvserve.model.backends import Backends, resolve_backends
from kvserve.model.config import MAMBA, ModelConfig
from kvserve.model.invariant import linear, packs_linears, prepack_model_linears
from kvserve.model.mamba2 import MixerStates, MixerWeights, mamba_mixer
from kvserve.model.rope import apply_rope, rope_tables
from kvserve.model.weights import fuse, take


@dataclass
class RecurrentBatch:
    """Which rows of the flat batch belong to which sequence, and where their states are.

    Rows [0, num_decodes) are single decode tokens (sequence i = row i); then one prefill chunk per entry of
    prefills, (row_start, num_tokens). slots[i] is sequence i's slot in the pool tensors.
    """

    num_decodes: int
    prefills: list[tuple[int, int]]
    slots: torch.Tensor  # (S,) long
    conv: torch.Tensor  # pool: (recurrent layers, slots, C, K - 1)
    ssm: torch.Tensor  # pool: (recurrent layers, slots, H, P, N) float32


@dataclass
class HybridLayer:
    input_norm: torch.Tensor  # (D,)
    mixer: MixerWeights | None  # a recurrent layer ...
    qkv: torch.Tensor | None  # ... or an attention one: ((H + 2 KVH) * hd, D)
    o_proj: torch.Tensor | None  # (D, H * hd)
    post_norm: torch.Tensor | None  # (D,); None without MLP
    gate_up: torch.Tensor | None  # (2 * I, D)
    down: torch.Tensor | None  # (D, I)


def _names(config: ModelConfig) -> dict[str, str]:
    """transformers' parameter names for each architecture ({i} = layer index)."""
    if config.architecture == "mamba2":
        return {
            "embed": "backbone.embeddings.weight",
            "final_norm": "backbone.norm_f.weight",
            "input_norm": "backbone.layers.{i}.norm.weight",
            "mixer": "backbone.layers.{i}.mixer.",
        }
    return {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.final_layernorm.weight",
        "input_norm": "model.layers.{i}.input_layernorm.weight",
        "mixer": "model.layers.{i}.mamba.",
        "attn": "model.layers.{i}.self_attn.",
        "post_norm": "model.layers.{i}.pre_ff_layernorm.weight",
        "mlp": "model.layers.{i}.feed_forward.",
    }


def expected_weight_names(config: ModelConfig) -> set[str]:
    """The exact parameter names a hybrid / recurrent checkpoint with this config must have."""
    n = _names(config)
    m = config.mamba
    assert m is not None
    names = {n["embed"], n["final_norm"]}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i, kind in enumerate(config.layer_types):
        names.add(n["input_norm"].format(i=i))
        if kind == MAMBA:
            p = n["mixer"].format(i=i)
            names.update(p + s for s in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight"))
            names.add(p + "out_proj.weight")
            if m.conv_bias:
                names.add(p + "conv1d.bias")
            if m.proj_bias:
                names.update((p + "in_proj.bias", p + "out_proj.bias"))
        else:
            names.update(n["attn"].format(i=i) + f"{x}_proj.weight" for x in "qkvo")
        if config.has_mlp:
            names.add(n["post_norm"].format(i=i))
            names.update(n["mlp"].format(i=i) + f"{x}_proj.weight" for x in ("gate", "up", "down"))
    return names


class HybridModel:
    """Weights plus forward(); the KV cache and recurrent states are arguments, never held here."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        backends: Backends | None = None,
    ):
        assert config.mamba is not None
        self.config = config
        self.dtype = dtype
        self.device = device
        backends = backends or resolve_backends(device, dtype)  # the `auto` choice
        self.native_attention = backends.native_attention
        self.names = _names(config)

        def w(name: str, dt: torch.dtype = dtype) -> torch.Tensor:  # converted once from the file's dtype
            return take(weights, name, dt, device)

        self._w = w
        self._fuse = lambda *names: fuse(weights, names, dtype, device)  # no part outlives its copy
        self.embed = w(self.names["embed"])  # (V, D)
        self.lm_head = self.embed if config.tie_word_embeddings else w("lm_head.weight")
        self.final_norm = w(self.names["final_norm"])
        self.layers = [self._layer(i) for i in range(config.num_hidden_layers)]
        del self._w, self._fuse  # drop the references to the source weights
        # the kernel's panels (else oneDNN's blocked layout): faster
        if packs_linears(device, dtype, backends.native_linear):
            prepack_model_linears(self, backends.native_linear)
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.cos = self.sin = torch.empty(0)
        if config.num_attention_layers and self.rotary_dim:
            cos, sin = rope_tables(self.rotary_dim, config.rope_theta, config.rope_scaling, max_len)
            self.cos = cos.to(device=device, dtype=dtype)  # (max_len, rotary_dim)
            self.sin = sin.to(device=device, dtype=dtype)
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim

    def _layer(self, i: int) -> HybridLayer:
        cfg, n, w = self.config, self.names, self._w
        mixer = qkv = o_proj = post_norm = gate_up = down = None
        if cfg.layer_types[i] == MAMBA:
            mixer = self._mixer(n["mixer"].format(i=i))
        else:
            p = n["attn"].format(i=i)
            qkv = self._fuse(*(p + f"{x}_proj.weight" for x in "qkv"))
            o_proj = w(p + "o_proj.weight")
        if cfg.has_mlp:
            p = n["mlp"].format(i=i)
            post_norm = w(n["post_norm"].format(i=i))
            gate_up = self._fuse(p + "gate_proj.weight", p + "up_proj.weight")
            down = w(p + "down_proj.weight")
        return HybridLayer(w(n["input_norm"].format(i=i)), mixer, qkv, o_proj, post_norm, gate_up, down)

    def _mixer(self, p: str) -> MixerWeights:
        w, m = self._w, self.config.mamba
        assert m is not None
        f32 = torch.float32
        return MixerWeights(
            in_proj=w(p + "in_proj.weight"),
            in_proj_bias=w(p + "in_proj.bias") if m.proj_bias else None,
            conv_weight=w(p + "conv1d.weight"),
            conv_bias=w(p + "conv1d.bias") if m.conv_bias else None,
            dt_bias=w(p + "dt_bias", f32),
            A=-torch.exp(w(p + "A_log", f32)),
            D=w(p + "D", f32),
            norm=w(p + "norm.weight"),
            out_proj=w(p + "out_proj.weight"),
            out_proj_bias=w(p + "out_proj.bias") if m.proj_bias else None,
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)

    def _attention(
        self, h: torch.Tensor, layer: HybridLayer, kv_layer: torch.Tensor, meta: AttentionMetadata, rope
    ) -> torch.Tensor:
        cfg = self.config
        T = h.shape[0]
        H, KVH, hd, rd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, self.rotary_dim
        qkv = linear(h, layer.qkv)  # (T, (H + 2 KVH) hd)
        qk = qkv[:, : self.q_size + self.kv_size].reshape(T, H + KVH, hd)
        if rd:
            cos, sin = rope
            qk = torch.cat([apply_rope(qk[..., :rd], cos, sin), qk[..., rd:]], dim=-1)
        q, k = qk[:, :H], qk[:, H:]
        write_kv(kv_layer, k, qkv[:, self.q_size + self.kv_size :].view(T, KVH, hd), meta.slot_mapping)
        attn = paged_attention(q.contiguous(), kv_layer, meta, self.scale)  # (T, H, hd)
        return linear(attn.reshape(T, H * hd), layer.o_proj)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
        rec: RecurrentBatch,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids (T,); kv_cache (attention layers, 2, kvh, blocks, bs, hd).

        -> logits (S, V) float32, and the sequences' states after the step: conv (Lr, S, C, K - 1) and
        ssm (Lr, S, H, P, N), in rec.slots order (not yet written to the pool).
        """
        rope = None
        if self.config.num_attention_layers and self.rotary_dim:
            rope = (self.cos[meta.positions].unsqueeze(1), self.sin[meta.positions].unsqueeze(1))  # (T, 1, rd)
        x = self.embed[input_ids]  # (T, D)
        if self.config.residual_in_fp32:  # as transformers' Mamba2Block: norm and mixer in the model dtype
            x = x.float()
        new_conv, new_ssm = [], []
        attn_i = rec_i = 0
        for layer in self.layers:
            h = self._norm(x.to(self.dtype), layer.input_norm)
            if layer.mixer is not None:
                states = MixerStates(rec.conv[rec_i, rec.slots], rec.ssm[rec_i, rec.slots])
                out, after = mamba_mixer(h, layer.mixer, self.config.mamba, rec.num_decodes, rec.prefills, states)
                new_conv.append(after.conv)
                new_ssm.append(after.ssm)
                rec_i += 1
            else:
                out = self._attention(h, layer, kv_cache[attn_i], meta, rope)
                attn_i += 1
            x = x + out
            if layer.gate_up is not None:
                h = self._norm(x, layer.post_norm)
                gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)
                x = x + linear(F.silu(gate) * up, layer.down)
        h = self._norm(x[logits_rows], self.final_norm.to(x.dtype)).to(self.dtype)
        return linear(h, self.lm_head).float(), torch.stack(new_conv), torch.stack(new_ssm)
