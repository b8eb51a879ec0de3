"""kvserve's CPU linear kernel and fused Llama layer (kvserve/model/csrc/linear.c, layer.c) against references.

* the linear kernel against float64 brute force (and bfloat16 outputs within one rounding of it), with bias
  and residual epilogues; a row's bits do not depend on the row count, the offset or the thread count;
* the fused layer against the same layer written op by op in float64 (its own numerics: RMSNorm, RoPE,
  SwiGLU), and bit-identical rows whatever batch and chunking they are computed in;
* the fused RMSNorm against the float64 formula.
"""

from __future__ import annotations

import pytest
import torch

from kvserve.model import native
from tests.conftest import require_native_linear

CPU = torch.device("cpu")
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (100, 34)]  # the model's, and a ragged one
ROW_COUNTS = [1, 2, 3, 7, 8, 9, 31, 64, 65, 200]


def _bf16_steps(x: torch.Tensor) -> torch.Tensor:
    """float64 values -> their float32 -> their bfloat16 rounding (as float64)."""
    return x.float().to(torch.bfloat16).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_brute_force_and_rows_are_invariant(dtype, shape):
    require_native_linear(dtype)
    gen = torch.Generator().manual_seed(1)
    n, k = shape
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    res = torch.randn(240, n, generator=gen).to(dtype)
    x = torch.randn(240, k, generator=gen).to(dtype)
    packed = native.PackedLinear(w)
    assert packed.shape == (n, k) and packed.numel() == n * k
    exact = x.double() @ w.double().T
    for b, r in ((None, None), (bias, None), (None, res), (bias, res)):
        whole = packed(x, b, r)
        assert whole.shape == (240, n) and whole.dtype == dtype
        ref = exact + (0 if b is None else b.double())
        if dtype == torch.float32:
            ref = ref + (0 if r is None else r.double())
            torch.testing.assert_close(whole.double(), ref, atol=2e-5 * k**0.5, rtol=1e-5)
        else:  # the linear's output rounds to bf16 first, then the residual is added and rounded again
            ref = _bf16_steps(ref)
            ref = _bf16_steps(ref + (0 if r is None else r.double()))
            torch.testing.assert_close(whole.double(), ref, atol=1e-2, rtol=1e-2)
        for m in ROW_COUNTS:
            for start in range(0, 240 - m, 37):
                part = packed(x[start : start + m], b, None if r is None else r[start : start + m])
                assert torch.equal(part, whole[start : start + m]), (m, start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_thread_count(dtype):
    require_native_linear(dtype)
    gen = torch.Generator().manual_seed(2)
    packed = native.PackedLinear((torch.randn(3072, 576, generator=gen) * 0.05).to(dtype))
    x = torch.randn(100, 576, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(packed(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [1536, 256, 24, 5])  # the model's; partial last panels; fewer than one panel
def test_swiglu_epilogue_matches_gate_up_then_swiglu(dtype, inter):
    """The SwiGLU-packed gate_up (csrc/linear.c's epilogue) against the plain kernel's gate and up outputs
    followed by silu(g) * u in float64, with the fused layer's roundings; rows invariant to the row count."""
    require_native_linear(dtype)
    gen = torch.Generator().manual_seed(inter)
    k = 192
    w = (torch.randn(2 * inter, k, generator=gen) * k**-0.5).to(dtype)
    x = (torch.randn(100, k, generator=gen) * 2).to(dtype)
    packed = native.PackedLinear(w, swiglu=True)
    act = packed(x)
    assert act.shape == (100, inter) and act.dtype == dtype
    gu = native.PackedLinear(w)(x).double()  # gate and up as the plain linear rounds them
    g, u = gu[:, :inter], gu[:, inter:]
    silu = g * torch.sigmoid(g)
    if dtype == torch.bfloat16:  # silu rounded, then the product rounded: within 2 bf16 ulps
        torch.testing.assert_close(act.double(), _bf16_steps(_bf16_steps(silu) * u), atol=1e-6, rtol=2**-7)
    else:  # kvmath.h's exp is within about 1 ulp
        torch.testing.assert_close(act.double(), silu * u, atol=1e-6, rtol=1e-5)
    for m in (1, 7, 8, 9, 33, 65):
        for start in (0, 13, 100 - m):
            assert torch.equal(packed(x[start : start + m]), act[start : start + m]), (m, start)
    with pytest.raises(ValueError, match="no bias or residual"):
        packed(x, residual=act)


def test_linear_rejects_a_wrong_input():
    require_native_linear(torch.float32)
    packed = native.PackedLinear(torch.randn(8, 16))
    with pytest.raises(ValueError, match="linear of a"):
        packed(torch.randn(2, 15))
    with pytest.raises(ValueError, match="linear of a"):
        packed(torch.randn(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 100])  # the model's; a partial last 16-lane vector
def test_rmsnorm_matches_the_formula(dtype, width):
    require_native_linear(dtype)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(50, width, generator=gen) * 3).to(dtype)
    w = torch.randn(width, generator=gen).to(dtype)
    got = native.rmsnorm(x, w, 1e-5)
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    if dtype == torch.bfloat16:
        ref = _bf16_steps(w.double() * _bf16_steps(normed))
        torch.testing.assert_close(got.double(), ref, atol=0, rtol=2**-6)  # two roundings: within 2 bf16 ulps
    else:
        torch.testing.assert_close(got.double(), w.double() * normed, atol=1e-5, rtol=1e-5)
    assert torch.equal(native.rmsnorm(x[7:9], w, 1e-5), got[7:9])


def _tiny_llama(dtype: torch.dtype, hd: int = 64, bias: bool = False, inter: int = 256):
    """A random 2-layer Llama with the fused path (3 query heads per KV head; Qwen2-style qkv biases if bias)."""
    from kvserve.model.config import ModelConfig
    from kvserve.model.llama import LlamaModel

    cfg = ModelConfig(
        architecture="llama",
        vocab_size=300,
        hidden_size=192,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=hd,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=bias,
        bos_token_id=None,
        eos_token_ids=(0,),
    )
    gen = torch.Generator().manual_seed(4)
    weights = {
        "model.embed_tokens.weight": torch.randn(300, 192, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(192, generator=gen),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (3 * hd, 192)),
            ("self_attn.k_proj", (hd, 192)),
            ("self_attn.v_proj", (hd, 192)),
            ("self_attn.o_proj", (192, 3 * hd)),
            ("mlp.gate_proj", (inter, 192)),
            ("mlp.up_proj", (inter, 192)),
            ("mlp.down_proj", (192, inter)),
        ]:
            weights[p + name + ".weight"] = torch.randn(*shape, generator=gen) * shape[1] ** -0.5
            if bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                weights[p + name + ".bias"] = 0.5 * torch.randn(shape[0], generator=gen)
        weights[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(192, generator=gen)
        weights[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(192, generator=gen)
    return cfg, weights, LlamaModel(cfg, weights, dtype, CPU, 512)


def _reference_logits(cfg, weights, ids: list[int]) -> torch.Tensor:
    """The fused layer's math, op by op in float64, for one sequence: logits of every position."""
    d = {k: v.double() for k, v in weights.items()}
    T, H, KVH, hd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    from kvserve.model.rope import rope_tables

    cos, sin = (t.double()[:T] for t in rope_tables(hd, cfg.rope_theta, cfg.rope_scaling, 512))

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x):  # (T, heads, hd)
        rot = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = d["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, d[p + "input_layernorm.weight"])
        q, k, v = (h @ d[p + f"self_attn.{c}_proj.weight"].T + d.get(p + f"self_attn.{c}_proj.bias", 0) for c in "qkv")
        q, k, v = rope(q.view(T, H, hd)), rope(k.view(T, KVH, hd)), v.view(T, KVH, hd)
        k, v = (t.repeat_interleave(H // KVH, dim=1) for t in (k, v))
        s = torch.einsum("thd,shd->hts", q, k) * hd**-0.5 + mask
        a = torch.einsum("hts,shd->thd", torch.softmax(s, -1), v).reshape(T, H * hd)
        x = x + a @ d[p + "self_attn.o_proj.weight"].T
        h = norm(x, d[p + "post_attention_layernorm.weight"])
        g, u = h @ d[p + "mlp.gate_proj.weight"].T, h @ d[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ d[p + "mlp.down_proj.weight"].T
    return norm(x, d["model.norm.weight"]) @ d["model.embed_tokens.weight"].T


def _step(model, kv, seqs):
    """seqs: (token ids, first position, block table) per sequence, rows in that order -> logits of every row."""
    bs = kv.shape[4]
    from kvserve.model.attention import AttentionMetadata

    ids = [t for toks, _, _ in seqs for t in toks]
    positions = torch.tensor([p0 + i for toks, p0, _ in seqs for i in range(len(toks))])
    slots = torch.tensor([tb[(p0 + i) // bs] * bs + (p0 + i) % bs for toks, p0, tb in seqs for i in range(len(toks))])
    nm = native.build_meta([tb for _, _, tb in seqs], [len(toks) for toks, _, _ in seqs], positions, CPU)
    meta = AttentionMetadata(slot_mapping=slots, positions=positions, groups=[], native=nm)
    return model.forward(torch.tensor(ids), kv, meta, torch.arange(len(ids)))


@pytest.mark.parametrize(
    ("dtype", "hd", "bs", "bias"),
    [
        (torch.float32, 64, 16, False),
        (torch.bfloat16, 64, 16, False),
        (torch.float32, 32, 8, True),
        (torch.bfloat16, 32, 8, True),
        (torch.float32, 48, 16, False),  # head_dim not a multiple of 32: RoPE's scalar path
        (torch.bfloat16, 48, 16, True),
    ],
)
def test_fused_layer_matches_float64_and_is_batch_invariant(dtype, hd, bs, bias):
    require_native_linear(dtype)
    assert native.enabled(CPU, dtype)  # the linear kernel's library is the attention kernel's
    cfg, weights, model = _tiny_llama(dtype, hd, bias)
    assert model.fused
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 300, (45,), generator=gen).tolist()
    b = torch.randint(0, 300, (20,), generator=gen).tolist()
    kv = torch.zeros(2, 2, 1, 16, bs, hd, dtype=dtype)
    ta, tb = [3, 0, 9, 12, 6, 4], [5, 7, 10]
    alone = _step(model, kv, [(a, 0, ta)])
    ref = _reference_logits(cfg, weights, a)
    # float32: to rounding; bfloat16 (8-bit mantissas through two layers): within 3% of the logits' range
    tol = 1e-3 if dtype == torch.float32 else 0.03 * ref.abs().max().item()
    torch.testing.assert_close(alone.double(), ref, atol=tol, rtol=0)
    # the same tokens again: in chunks, next to another sequence, one decode row at a time, other blocks
    kv2 = torch.zeros_like(kv)
    ta2 = [11, 2, 14, 1, 13, 15]
    first = _step(model, kv2, [(b, 0, tb), (a[:17], 0, ta2)])
    rest = _step(model, kv2, [(a[17:44], 17, ta2), (b[:1], 0, [8])])  # a junk one-row neighbour in a free block
    last = _step(model, kv2, [(a[44:], 44, ta2)])
    assert torch.equal(torch.cat([first[20:], rest[:27], last]), alone)


def test_an_odd_bf16_width_keeps_the_unfused_path_and_plain_gate_up():
    """bf16 with an odd intermediate size: down_proj cannot take VDPBF16PS pairs, so no fused layer, and gate_up
    keeps its plain packing (the SwiGLU pack is only for the fused layer); the forward still matches float64."""
    require_native_linear(torch.bfloat16)
    cfg, weights, model = _tiny_llama(torch.bfloat16, inter=255)
    assert not model.fused
    assert not any(getattr(layer.gate_up, "swiglu", False) for layer in model.layers)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    kv = torch.zeros(2, 2, 1, 16, 16, 64, dtype=torch.bfloat16)
    from kvserve.model.attention import AttentionMetadata, build_group

    positions = torch.arange(20)
    slots = torch.tensor([[3, 0][p // 16] * 16 + p % 16 for p in range(20)])
    groups = [build_group(0, [list(range(20))], [[3, 0]], 16, 3, CPU)]
    nm = native.build_meta([[3, 0]], [20], positions, CPU) if native.enabled(CPU, torch.bfloat16) else None
    meta = AttentionMetadata(slot_mapping=slots, positions=positions, groups=groups, native=nm)
    got = model.forward(torch.tensor(ids), kv, meta, torch.arange(20)).double()
    ref = _reference_logits(cfg, weights, ids)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 through 2 layers: a loose bound


def test_bf16_linears_run_on_amx_where_the_cpu_has_it():
    """On CPUs with AMX, bf16 linears (K a multiple of 32) run on AMX tiles: prefill and batched decode are
    several times faster there than on VDPBF16PS (docs/benchmarks.md). Rows stay invariant (the tests above run
    whichever path this machine takes)."""
    from tests.conftest import require_cpu_flags

    require_native_linear(torch.bfloat16)
    require_cpu_flags("amx_tile", "amx_bf16")
    assert native.load().kvserve_linear_features() & 4, "the kernel was built without AMX or refused the AMX state"
