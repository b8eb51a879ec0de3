"""Our own forward pass of the Llama family over a flat batch and a paged KV cache.

RMSNorm -> fused QKV (+bias for Qwen2) -> RoPE -> paged attention (GQA) -> o_proj -> residual
        -> RMSNorm -> fused gate/up -> SwiGLU -> down_proj -> residual;  final RMSNorm -> (tied) lm_head.
Numerics follow Hugging Face's modeling_llama (RoPE tables cast to the model dtype, residual stream in the
model dtype) except that RMSNorm is torch's fused op, which applies the weight before rounding to bfloat16.
Logits are computed only for the rows that sample.

The other families (Mistral, Qwen2/3, Gemma 2/3, Phi-3: kvserve/model/family_config.py) are this layer with
the variations of kvserve/model/families.py: q/k norms, Gemma's (1 + w) norms around attention and MLP,
GELU, soft-capping, partial rotary, per-layer RoPE bases and sliding windows. Where a model needs one that
the C kernels lack, the layers run op by op here (`fused` False) and attention on the torch path if the
attention kernel lacks it (families.attention_kernel_gaps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.model import native
from kvserve.model.attention import AttentionMetadata, paged_attention, write_kv
from kvserve.model.backends import Backends, resolve_backends
from kvserve.model.config import ModelConfig
from kvserve.model.families import (
    active_windows,
    attention_kernel_gaps,
    embed_scale,
    fused_layer_gaps,
    gated_activation,
    norm_weight,
    rms_norm,
    softcap_,
)
from kvserve.model.invariant import (
    linear,
    packed_linears_of,
    packs_linears,
    place_in_huge_pages,
    prepack_layer,
    prepack_linears,
    prepack_model_linears,
)
from kvserve.model.rope import apply_rope, rope_tables
from kvserve.model.weights import WeightFiles, fuse, take


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    qkv: torch.Tensor  # ((H + 2 KVH) * hd, D)
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # (D, H * hd)
    post_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 * I, D)
    down: torch.Tensor  # (D, I)
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # (hd,) per-head norms of q and k (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    # Gemma: post_norm normalises the attention output; these are the MLP's input and output norms
    pre_ffn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    window: int | None = None  # keys a query sees (sliding window), None: all before it
    rope: int = 0  # which of the model's RoPE tables (Gemma 3's windowed layers have their own base)


class LlamaModel:
    """Weights plus forward(); holds no per-request state (the KV cache is an argument)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        backends: Backends | None = None,
        quantized: bool = False,
    ):
        self.config = config
        self.dtype = dtype
        self.device = device
        backends = backends or resolve_backends(device, dtype)  # the `auto` choice
        # the attention kernel only where it implements what the model needs (the builder resolves the same)
        self.native_attention = backends.native_attention and attention_kernel_gaps(config, max_len) is None
        self.gemma = config.gemma_norms

        def w(name: str) -> torch.Tensor:  # converted once from the file's dtype (model/weights.py)
            return take(weights, name, dtype, self.device)

        # GGUF quantized weights may stay as stored (EngineConfig.weights "auto"): only on kvserve's linear kernel
        self._keep_quantized = quantized and backends.native_linear and packs_linears(device, dtype, True)
        self._keep_quantized &= dtype in (torch.float32, torch.bfloat16)

        def norm(name: str) -> torch.Tensor:  # Gemma's norms keep (1 + w) in float32, as transformers
            return norm_weight(w(name), self.gemma)

        self.embed = self._linear(weights, ("model.embed_tokens.weight",))  # (V, D): the lookup table
        self.embed_scale = embed_scale(config, dtype, device)
        self.lm_head = self.embed if config.tie_word_embeddings else self._linear(weights, ("lm_head.weight",))
        if packs_linears(device, dtype, backends.native_linear):  # packed (and moved to huge pages) while little
            prepack_linears(self, ("lm_head",), backends.native_linear)  # else is resident: the largest copies
            place_in_huge_pages(packed_linears_of(self))
        self.final_norm = norm("model.norm.weight")
        windows = active_windows(config, max_len)
        # Where both CPU kernels run (attention and linears), one C call per layer (csrc/layer.c): no Python
        # or torch dispatch between the layer's ops. A per-process choice, like the kernels themselves.
        fusable = (
            self.native_attention
            and backends.native_linear
            and config.head_dim % 2 == 0
            and fused_layer_gaps(config, max_len) is None  # the C layer is Llama's (families.py)
            # VDPBF16PS takes input features in pairs: every linear's input width even in bf16
            and (dtype != torch.bfloat16 or config.hidden_size % 2 == config.intermediate_size % 2 == 0)
        )
        self._fusable = fusable  # quantized gate_up is packed for the fused layer's SwiGLU epilogue at once
        self.layers = []
        for i in range(config.num_hidden_layers):  # each layer packed as it is built: one plain copy at a time
            layer = self._layer(w, weights, norm, i, windows[i])
            # gate_up packed for the kernel's SwiGLU epilogue: the layer never stores gate/up (quantized ones
            # are packed so already)
            if fusable and not isinstance(layer.gate_up, native.PackedLinear):
                layer.gate_up = native.PackedLinear(layer.gate_up, swiglu=True)
            # the kernel's panels (else oneDNN's blocked layout): faster at batch 1
            if packs_linears(device, dtype, backends.native_linear):
                prepack_layer(layer, backends.native_linear)
            self.layers.append(layer)
        if packs_linears(device, dtype, backends.native_linear):
            prepack_model_linears(self, backends.native_linear)  # what is left (nothing, for this model)
        names = ("qkv", "o_proj", "gate_up", "down")
        linears = [self.embed, self.lm_head] + [getattr(la, n) for la in self.layers for n in names]
        self.quantized = any(isinstance(x, native.QuantLinear) for x in linears)  # kept as stored, not just allowed
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        # (cos, sin) per RoPE base, (max_len, rotary_dim) in the model dtype: [0] global, [1] Gemma 3's local
        bases = [(config.rope_theta, config.rope_scaling)]
        if config.local_rope_theta is not None:
            bases.append((config.local_rope_theta, None))
        self.ropes = []
        for theta, scaling in bases:
            cos, sin = rope_tables(self.rotary_dim, theta, scaling, max_len)
            self.ropes.append((cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)))
        self.cos, self.sin = self.ropes[0]  # the fused layer's (one base, full rotary)
        self.scale = config.query_scale if config.query_scale is not None else config.head_dim**-0.5
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim
        self.fused = fusable
        # the SwiGLU-packed gate_up is only for the fused layer; fusable implies every linear is on the kernel
        assert not fusable or all(
            isinstance(getattr(layer, n), native.PackedLinear) for layer in self.layers for n in names
        ), "the fused layer needs every linear on kvserve's kernel"
        if self.fused:  # each layer's weight addresses, for the one call that runs every layer
            self._layer_ptrs = torch.tensor(
                [
                    [
                        layer.input_norm.data_ptr(),
                        layer.post_norm.data_ptr(),
                        layer.qkv.descriptor().data_ptr(),
                        0 if layer.qkv_bias is None else layer.qkv_bias.data_ptr(),
                        layer.o_proj.descriptor().data_ptr(),
                        layer.gate_up.descriptor().data_ptr(),
                        layer.down.descriptor().data_ptr(),
                    ]
                    for layer in self.layers
                ],
                dtype=torch.int64,
            )

    @property
    def attention_windows(self) -> tuple[int, ...]:
        """The distinct sliding windows of the layers (the runner builds each one's key ranges per step)."""
        return tuple(sorted({layer.window for layer in self.layers if layer.window is not None}))

    def _linear(self, weights, names: tuple[str, ...], swiglu: bool = False) -> torch.Tensor | native.QuantLinear:
        """The named weights fused along dim 0: quantized panels where the model keeps GGUF quantized
        weights and every part is stored in a type the kernel runs (swiglu: packed for the fused layer's
        SwiGLU epilogue), else a tensor in the model dtype."""
        if self._keep_quantized:
            parts = [weights.quantized(n) if isinstance(weights, WeightFiles) else None for n in names]
            if all(part is not None for part in parts):
                return native.QuantLinear(parts, self.dtype, swiglu)
        if len(names) == 1:
            return take(weights, names[0], self.dtype, self.device)
        return fuse(weights, names, self.dtype, self.device)

    def embed_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding table (a new tensor), read from its quantized panels where it is kept so."""
        if isinstance(self.embed, native.QuantLinear):
            return self.embed.rows(input_ids)
        return self.embed[input_ids]

    def _layer(self, w, weights, norm, i: int, window: int | None) -> LayerWeights:
        cfg, p = self.config, f"model.layers.{i}."
        attn = p + "self_attn."

        def fused(*names: str) -> torch.Tensor:  # filled part by part: no part outlives its copy
            return fuse(weights, names, self.dtype, self.device)

        qkv_bias = None
        if cfg.attention_bias:
            qkv_bias = fused(*(attn + f"{n}_proj.bias" for n in "qkv"))
        return LayerWeights(
            input_norm=norm(p + "input_layernorm.weight"),
            qkv=self._linear(weights, tuple(attn + f"{n}_proj.weight" for n in "qkv")),
            qkv_bias=qkv_bias,
            o_proj=self._linear(weights, (attn + "o_proj.weight",)),
            post_norm=norm(p + "post_attention_layernorm.weight"),
            gate_up=self._linear(weights, (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), self._fusable),
            down=self._linear(weights, (p + "mlp.down_proj.weight",)),
            o_bias=w(attn + "o_proj.bias") if cfg.o_proj_bias else None,
            q_norm=norm(attn + "q_norm.weight") if cfg.qk_norm else None,
            k_norm=norm(attn + "k_norm.weight") if cfg.qk_norm else None,
            pre_ffn_norm=norm(p + "pre_feedforward_layernorm.weight") if self.gemma else None,
            post_ffn_norm=norm(p + "post_feedforward_layernorm.weight") if self.gemma else None,
            window=window,
            # Gemma 3: the layers transformers calls sliding (window active or not) take the local base
            rope=int(cfg.local_rope_theta is not None and cfg.layer_windows[i] is not None),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One fused op (row-wise, so batch-invariant); torch computes it in float32 internally.
        return rms_norm(x, weight, self.config.rms_norm_eps, self.gemma)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """input_ids: (T,); kv_cache: (layers, 2, kvh, blocks, bs, hd); -> logits (S, V) float32."""
        if self.fused:
            return self._forward_fused(input_ids, kv_cache, meta, logits_rows)
        positions = meta.positions
        ropes = [(cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)) for cos, sin in self.ropes]  # (T, 1, rd)
        x = self.embed_rows(input_ids)  # (T, D)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for layer, kv_layer in zip(self.layers, kv_cache):
            x = self._layer_forward(x, layer, kv_layer, meta, ropes[layer.rope])
        h = self._norm(x[logits_rows], self.final_norm)
        logits = linear(h, self.lm_head)
        if self.config.final_softcap is not None:
            logits = softcap_(logits, self.config.final_softcap)
        return logits.float()

    def _layer_forward(
        self, x: torch.Tensor, layer: LayerWeights, kv_layer: torch.Tensor, meta: AttentionMetadata, rope
    ) -> torch.Tensor:
        cfg = self.config
        T = x.shape[0]
        H, KVH, hd, rd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, self.rotary_dim
        h = self._norm(x, layer.input_norm)
        qkv = linear(h, layer.qkv, layer.qkv_bias)  # (T, (H + 2 KVH) hd)
        qk = qkv[:, : self.q_size + self.kv_size].view(T, H + KVH, hd)
        if layer.q_norm is not None:  # each head normalised before RoPE
            qk = torch.cat([self._norm(qk[:, :H], layer.q_norm), self._norm(qk[:, H:], layer.k_norm)], dim=1)
        cos, sin = rope
        qk = apply_rope(qk, cos, sin) if rd == hd else torch.cat([apply_rope(qk[..., :rd], cos, sin), qk[..., rd:]], -1)
        q, k = qk[:, :H], qk[:, H:]
        write_kv(kv_layer, k, qkv[:, self.q_size + self.kv_size :].view(T, KVH, hd), meta.slot_mapping)
        attn = paged_attention(q, kv_layer, meta, self.scale, layer.window, cfg.attn_softcap)  # (T, H, hd)
        if layer.pre_ffn_norm is None:  # Llama: residual + o_proj, then the MLP's input norm
            x = linear(attn.view(T, H * hd), layer.o_proj, layer.o_bias, residual=x)
            h = self._norm(x, layer.post_norm)
        else:  # Gemma: the attention output normalised before the residual add, and the MLP's own input norm
            x = x + self._norm(linear(attn.view(T, H * hd), layer.o_proj, layer.o_bias), layer.post_norm)
            h = self._norm(x, layer.pre_ffn_norm)
        gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)
        act = gated_activation(gate, up, cfg.hidden_act)
        if layer.post_ffn_norm is None:
            return linear(act, layer.down, residual=x)
        return x + self._norm(linear(act, layer.down), layer.post_ffn_norm)

    def _forward_fused(
        self, input_ids: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """forward() with every layer in one call of csrc/layer.c (same inputs and outputs)."""
        cfg, lib, nm = self.config, native.load(), meta.native
        assert lib is not None and nm is not None, "the fused layer needs the native attention metadata"
        T, D, inter = input_ids.shape[0], cfg.hidden_size, cfg.intermediate_size
        H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bf = int(self.dtype == torch.bfloat16)
        # the C code indexes raw memory: the layouts and bounds it assumes, checked (cheap) rather than trusted
        assert kv_cache.is_contiguous() and meta.positions.dtype == meta.slot_mapping.dtype == torch.int64
        assert meta.positions.is_contiguous() and meta.slot_mapping.is_contiguous()
        assert T == 0 or int(meta.positions.max()) < self.cos.shape[0], "position past the RoPE tables"
        x = self.embed_rows(input_ids)  # (T, D), a new tensor: the layers update it in place
        work = torch.empty(lib.kvserve_llama_layer_scratch(T, D, H, KVH, hd, inter, bf), dtype=torch.uint8)
        _, _, _, nb, bs, _ = kv_cache.shape
        eps = cfg.rms_norm_eps
        rc = lib.kvserve_llama_layers(
            len(self.layers), self._layer_ptrs.data_ptr(), x.data_ptr(), T, D, bf, eps, inter,
            self.cos.data_ptr(), self.sin.data_ptr(), meta.positions.data_ptr(), meta.slot_mapping.data_ptr(),
            kv_cache.data_ptr(), kv_cache.stride(0) * kv_cache.element_size(),
            nm.tables.data_ptr(), nm.tables.shape[1], nm.segs.data_ptr(), nm.segs.shape[0],
            H, KVH, nb, bs, hd, self.scale, native.TILE, torch.get_num_threads(), work.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("attention kernel could not allocate its scratch memory")
        h = native.rmsnorm(x[logits_rows], self.final_norm, eps)
        return linear(h, self.lm_head).float()
