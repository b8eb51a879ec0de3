"""Small random Llama GGUF files whose tensors are stored quantized (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), written
with gguf-py's GGUFWriter for the tests of quantized weights (tests/model/test_quant_weights.py).

Hidden 256, 2 layers, 4 heads of 64, 2 KV heads, intermediate 512, and test_loader's toy byte-level vocabulary
(99 tokens), so a whole model is a few hundred KiB and loads in milliseconds. Q8_0, Q4_0 and Q4_1 tensors are
random float weights quantized by gguf-py; gguf-py cannot quantize the K-quants, so Q4_K and Q6_K tensors are
random well-formed raw blocks (every bit pattern of the packed 6-bit scales, nibbles and high bits occurs; the
f16 super-block scales are kept small so that nothing overflows, a few are 0, -0 or subnormal). Some blocks of
the gguf-py-quantized tensors are all zero or tiny (a zero or subnormal f16 scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

Q = GGMLQuantizationType

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 256, 2, 4, 2, 64, 512
CONTEXT = 512
# std of the random float weights (before gguf-py quantizes them): big enough that greedy decoding does not
# settle on one token, an embedding big enough that logprobs are not all near log(1 / VOCAB)
LAYER_STD, EMBED_STD = 0.1, 0.3

# a toy byte-level vocabulary (as tests/model/test_loader.py's): BOS, EOS, the space, printable ASCII, two merges
TOKENS = ["<s>", "</s>", "Ġ", *(chr(c) for c in range(33, 127)), "Ġh", "Ġhi"]
VOCAB = len(TOKENS)

# role -> (GGUF tensor name, with {i} for the layer; (out, in) shape)
LAYER_ROLES: dict[str, tuple[str, tuple[int, int]]] = {
    "attn_q": ("blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
    "attn_k": ("blk.{i}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_v": ("blk.{i}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_output": ("blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)),
    "ffn_gate": ("blk.{i}.ffn_gate.weight", (INTERMEDIATE, HIDDEN)),
    "ffn_up": ("blk.{i}.ffn_up.weight", (INTERMEDIATE, HIDDEN)),
    "ffn_down": ("blk.{i}.ffn_down.weight", (HIDDEN, INTERMEDIATE)),
}
ROLES = ("embed", *LAYER_ROLES, "output")

_LAYER_ROLES = tuple(LAYER_ROLES)

# Named mixes of tensor types. A key is a role (every layer) or "blk.{i}.{role}" (that layer only, overriding
# the role); a missing layer role or "embed" is F32, a missing "output" ties lm_head to the token embedding.
QUANT_MIXES: dict[str, dict[str, GGMLQuantizationType]] = {
    # like llama.cpp's Q8_0 files: everything Q8_0, lm_head tied to the Q8_0 embedding
    "q8_0": {"embed": Q.Q8_0, **dict.fromkeys(_LAYER_ROLES, Q.Q8_0)},
    # Q4_0 layers, a Q8_0 embedding tied as lm_head
    "q4_0": {"embed": Q.Q8_0, **dict.fromkeys(_LAYER_ROLES, Q.Q4_0)},
    # Q4_1 layers and embedding, an untied Q8_0 lm_head
    "q4_1": {"embed": Q.Q4_1, **dict.fromkeys(_LAYER_ROLES, Q.Q4_1), "output": Q.Q8_0},
    # like llama.cpp's Q4_K_M: Q4_K, but attn_v and ffn_down Q6_K in (here) the first layer, so layer 0's fused
    # q/k/v mixes Q4_K and Q6_K; a Q4_K embedding and an untied Q6_K lm_head
    "q4_k_m": {
        "embed": Q.Q4_K,
        **dict.fromkeys(_LAYER_ROLES, Q.Q4_K),
        "blk.0.attn_v": Q.Q6_K,
        "blk.0.ffn_down": Q.Q6_K,
        "output": Q.Q6_K,
    },
    # every fused group mixes block sizes (32 and 256) and float with quantized tensors, per layer differently;
    # a Q6_K embedding tied as lm_head
    "mixed": {
        "embed": Q.Q6_K,
        "attn_q": Q.Q8_0,
        "attn_k": Q.Q4_K,
        "attn_v": Q.Q4_1,
        "attn_output": Q.Q4_0,
        "ffn_gate": Q.Q6_K,
        "ffn_up": Q.Q4_0,
        "ffn_down": Q.Q8_0,
        "blk.1.attn_q": Q.F16,
        "blk.1.attn_k": Q.Q4_0,
        "blk.1.attn_v": Q.F32,
        "blk.1.attn_output": Q.Q6_K,
        "blk.1.ffn_gate": Q.Q4_1,
        "blk.1.ffn_up": Q.Q4_K,
        "blk.1.ffn_down": Q.F32,
    },
}

# prompts the toy vocabulary spells (printable ASCII and spaces); the longer ones fill full KV blocks of 16
PROMPTS = [
    "hi",
    "a hi b hi c",
    "The quick brown fox jumps over the lazy dog; hi hi hi!",
    "def f(x): return [x * 2 for x in range(10)] # hi",
    "0123456789 ABCDEFGHIJ klmnopqrst {|}~ hi hi hi hi hi hi hi hi hi hi",
]


def tensor_types(types: dict[str, GGMLQuantizationType]) -> dict[str, GGMLQuantizationType]:
    """GGUF tensor name -> type of every tensor write_quant_llama_gguf writes for `types` (norms F32)."""
    unknown = {k for k in types if k.rpartition(".")[2] not in ROLES or k.count(".") not in (0, 2)}
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles: {ROLES} (or blk.<layer>.<role>)")
    out = {"token_embd.weight": types.get("embed", Q.F32), "output_norm.weight": Q.F32}
    if "output" in types:
        out["output.weight"] = types["output"]
    for i in range(LAYERS):
        out[f"blk.{i}.attn_norm.weight"] = Q.F32
        out[f"blk.{i}.ffn_norm.weight"] = Q.F32
        for role, (name, _) in LAYER_ROLES.items():
            out[name.format(i=i)] = types.get(f"blk.{i}.{role}", types.get(role, Q.F32))
    return out


def tensor_shape(name: str) -> tuple[int, ...]:
    """The (out, in) shape (Hugging Face order) of a tensor write_quant_llama_gguf writes."""
    if name in ("token_embd.weight", "output.weight"):
        return (VOCAB, HIDDEN)
    if name.endswith("norm.weight"):
        return (HIDDEN,)
    role = name.split(".")[2]
    return LAYER_ROLES[role][1]


def write_quant_llama_gguf(path: Path | str, types: dict[str, GGMLQuantizationType], seed: int = 0) -> Path:
    """A random Llama GGUF at `path` whose tensors are stored as `types` says (see QUANT_MIXES); the same
    `types` and `seed` give the same bytes."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (VOCAB - 2))
    writer.add_token_merges(["Ġ h", "Ġh i"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    for name, kind in tensor_types(types).items():
        shape = tensor_shape(name)
        if len(shape) == 1:  # a norm: F32 around 1
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            array, raw_dtype = _stored(rng, shape, kind)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)  # a uint8 array's shape counts bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _stored(rng: np.random.Generator, shape: tuple[int, int], kind: GGMLQuantizationType):
    """(array, raw_dtype) for GGUFWriter.add_tensor: floats, gguf-py's quantization, or random K-quant blocks."""
    if kind in (Q.Q4_K, Q.Q6_K):
        return random_k_blocks(rng, shape, kind), kind
    std = EMBED_STD if shape[0] == VOCAB else LAYER_STD
    values = (std * rng.standard_normal(shape)).astype(np.float32)
    if kind == Q.F32:
        return values, None
    groups = values.reshape(-1, 32)  # some blocks of 32 all zero (scale 0), some tiny (a subnormal f16 scale)
    groups[3::29] = 0.0
    groups[7::31] *= 1e-4
    return quantize(values, kind), kind


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, int], kind: GGMLQuantizationType) -> np.ndarray:
    """Random well-formed Q4_K or Q6_K blocks of an (out, in) weight: uint8 (out, in // 256 * block bytes).

    Q4_K (144 bytes per 256 values): d f16, dmin f16, 12 bytes of packed 6-bit scales and mins, 128 bytes of
    nibbles; value = d * scale * q - dmin * min (d in [3e-4, 9e-4], dmin in [3e-3, 6e-3]: |w| < 0.9, std
    about 0.16). Q6_K (210 bytes): ql 128 bytes, qh 64, int8 scales[16], d f16; value = d * scale * (q - 32)
    (d of either sign, |d| in [7e-5, 1.4e-4], a normal f16: |w| < 0.6, std about 0.15).
    """
    block, size = GGML_QUANT_SIZES[kind]
    rows, cols = shape
    n = rows * cols // block
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)  # every packed bit pattern is well formed
    if kind == Q.Q4_K:
        d = rng.uniform(3e-4, 9e-4, n).astype(np.float16)
        dmin = rng.uniform(3e-3, 6e-3, n).astype(np.float16)
        _specials(d, start=2, values=SPECIAL_SCALES)
        _specials(dmin, start=5, values=SPECIAL_SCALES[:1] + SPECIAL_SCALES[2:])  # dmin >= 0
        blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
        blocks[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    elif kind == Q.Q6_K:
        d = (rng.uniform(7e-5, 1.4e-4, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16)
        _specials(d, start=2, values=SPECIAL_SCALES + [-v for v in SPECIAL_SCALES[2:]])
        blocks[:, 208:210] = d.view(np.uint8).reshape(n, 2)
    else:
        raise ValueError(f"random_k_blocks writes Q4_K or Q6_K, not {kind.name}")
    return blocks.reshape(rows, cols // block * size)


# f16 super-block scales that real files hold too (all-zero blocks; blocks of tiny weights): 0, -0, subnormals
SPECIAL_SCALES = [0.0, -0.0, 6e-8, 3e-5]


def _specials(scales: np.ndarray, start: int, values: list[float]) -> None:
    """Every 13th block from `start` gets one of `values` (in turn) as its f16 scale."""
    picked = scales[start::13]
    picked[:] = np.resize(np.array(values, dtype=np.float16), picked.shape)
