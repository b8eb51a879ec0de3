"""GEMMs whose result for a row does not depend on how many rows share the call.

Linear layers on CPU run on kvserve's own kernel (kvserve/model/csrc/linear.c, via native.PackedLinear) where
it builds: one fixed chain of fused multiply-adds per output, so invariant by construction, with no padding
row; as fast as oneDNN at 32 rows and up and up to 2x faster at 1-2 rows (bench/experiments/gemm_backends.py).
Elsewhere (no compiler, no AVX-512, or KVSERVE_LINEAR=onednn) they run on oneDNN's inner-product kernels
(`torch.ops.mkldnn._linear_pointwise`, the op torch's own inductor emits for CPU linears), not on F.linear.
Measured on this project's torch 2.13 CPU build
(tests/unit/test_invariant_gemm.py checks it on every run):
  * rows are bit-identical for every row count M >= 2 (M up to 4,200 and row offsets tried); one row takes a
    GEMV kernel that sums in another order (in bfloat16 that shows only where an output rounds the other way:
    seen with the real down_proj weights, K = 1,536), so a one-row call is padded to two rows;
  * except bfloat16 on CPUs with AMX (Xeon 4th generation and later): there oneDNN picks kernels by row count
    (one up to 32 rows, AMX tiles above) whose sums differ, so no padding makes rows invariant.
    `onednn_rows_invariant` probes this once; the engine then refuses the oneDNN linear backend in bfloat16
    (model/backends.py) and runs kvserve's kernel;
  * on this project's AMD EPYC machines it is about 2.2x faster than F.linear in float32 (F.linear calls
    MKL's sgemm, which takes a slow path on non-Intel CPUs): the model's linear layers at 2,048 rows 1.06 s
    vs 2.20 s, a batch-1 decode step's weights 20.9 ms at two rows vs 52.2 ms at MKL's four
    (bench/experiments/gemm_backends.py). bfloat16 is the same speed either way (F.linear already calls oneDNN there);
    prepack_linear_weight gains more in both dtypes.
float16 (no oneDNN fp16 kernel on CPUs without AVX512-FP16) and non-CPU devices keep F.linear. Under MKL a
float32 row count below 12 that is not a multiple of 4 takes a small-M kernel with another summation order,
and a one-row bfloat16 GEMM a GEMV path; `invariant_rows` pads those. The torch attention path's batched
matmuls (torch.matmul, MKL) use the same rule. On CUDA, cuBLAS picks split-K by shape; exactness there is not claimed
(documented in the README).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kvserve.model import native
from kvserve.model.device import huge_page_buffer, release_freed_memory


def invariant_rows(m: int, dtype: torch.dtype) -> int:
    """Row count for an MKL GEMM (F.linear, torch.matmul on CPU) so that each row is the same as in any batch."""
    if dtype == torch.float32 and m < 12 and m % 4:
        return (m + 3) // 4 * 4
    if dtype in (torch.bfloat16, torch.float16) and m == 1:
        return 2
    return m


@functools.cache
def uses_onednn(dtype: torch.dtype) -> bool:
    """Whether CPU linear layers of this dtype run on oneDNN's inner product (else F.linear)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def onednn_rows_invariant(dtype: torch.dtype) -> bool:
    """Whether this CPU's linear path for dtype (oneDNN or F.linear) gives a row the same bits at any row count:
    probed once on a (960, 576) weight, prefixes of a 160-row call against the whole call."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(960, 576, generator=gen) * 0.05).to(dtype)
    x = torch.randn(160, 576, generator=gen).to(dtype)
    ref = _linear(x, w, None)
    return all(torch.equal(_linear(x[:m], w, None), ref[:m]) for m in (1, 2, 3, 5, 17, 33, 64))


def packs_linears(device: torch.device, dtype: torch.dtype, native_linear: bool) -> bool:
    """Whether a model of this device and dtype packs its linear weights (for the kernel or for oneDNN)."""
    return device.type == "cpu" and (native_linear or uses_onednn(dtype))


def pack_linear_weight(weight: torch.Tensor, native_linear: bool) -> torch.Tensor | native.PackedLinear:
    """weight in the layout `linear` runs fastest on: the kernel's panels, else oneDNN's blocked layout."""
    odd_bf16 = weight.dtype == torch.bfloat16 and weight.shape[1] % 2  # VDPBF16PS takes pairs of features
    if native_linear and not odd_bf16:
        return native.PackedLinear(weight)
    return prepack_linear_weight(weight)


def prepack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout for `linear` (an opaque mkldnn tensor; CPU, uses_onednn dtypes).

    Same bits as the plain weight for every row count (tests/unit/test_invariant_gemm.py), and faster where
    weights stream from RAM: the bundled model's linears at two rows 7.9 vs 16.4 ms in bfloat16 and 16.1 vs
    20.9 ms in float32, at 2,048 rows 503 vs 590 ms and 975 vs 1,059 ms (bench/experiments/gemm_backends.py).
    The layout is chosen for a two-row call (a padded decode step) and measured as fast at every row count.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 2)


def prepack_linears(owner: object, names: tuple[str, ...], native_linear: bool) -> None:
    """Replace owner's named weight attributes (None ones and ones packed already skipped) with
    pack_linear_weight copies."""
    for name in names:
        weight = getattr(owner, name)
        if weight is not None and not isinstance(weight, native.PackedLinear) and not weight.is_mkldnn:
            setattr(owner, name, pack_linear_weight(weight, native_linear))


def prepack_model_linears(model: object, native_linear: bool) -> None:
    """Every linear weight of a Llama or hybrid model (its `layers`, their Mamba-2 mixers, its `lm_head`)
    prepacked. The lm_head gets its own packed copy even when tied: the embedding lookup needs the table."""
    for layer in model.layers:
        prepack_layer(layer, native_linear)
    prepack_linears(model, ("lm_head",), native_linear)
    place_in_huge_pages(packed_linears_of(model))


def prepack_layer(layer: object, native_linear: bool) -> None:
    """One layer's linears (and its Mamba-2 mixer's) prepacked and moved to huge pages: a model that does this
    as each layer is built holds one layer's plain and packed copies at a time while loading."""
    prepack_linears(layer, ("qkv", "o_proj", "gate_up", "down"), native_linear)
    mixer = getattr(layer, "mixer", None)
    if mixer is not None:
        prepack_linears(mixer, ("in_proj", "out_proj"), native_linear)
    place_in_huge_pages(packed_linears_of(layer, mixer))


def packed_linears(model: object) -> list[native.PackedLinear]:
    """The model's weights packed for kvserve's kernel (its layers', their mixers', its lm_head)."""
    owners = [model]
    for layer in model.layers:
        owners += [layer] + ([layer.mixer] if getattr(layer, "mixer", None) is not None else [])
    return packed_linears_of(*owners)


def packed_linears_of(*owners: object) -> list[native.PackedLinear]:
    """The PackedLinear attributes of the owners (None owners skipped), each object once."""
    seen: dict[int, native.PackedLinear] = {}
    for owner in owners:
        if owner is not None:
            for w in vars(owner).values():
                if isinstance(w, native.PackedLinear):
                    seen.setdefault(id(w), w)
    return list(seen.values())


def place_in_huge_pages(linears: list[native.PackedLinear]) -> None:
    """Move the packed weights into one buffer backed by transparent huge pages (device.huge_page_buffer);
    called per layer, so the copy adds one layer's weights to the peak while loading.

    Every decode step streams all of them from RAM; in 4 KiB pages that is a TLB miss per 4 KiB and the
    hardware prefetcher stops at each page boundary. Measured on the bundled model's gate_up (30 layers'
    weights in turn, in-process A/B, 2-core EPYC): 6-8% faster at 32 rows in both dtypes, 0-5% at one row.
    A copy changes no number.
    """
    linears = [w for w in linears if not getattr(w, "in_huge_pages", False)]
    if not linears:
        return
    nbytes = [w.packed.numel() * w.packed.element_size() for w in linears]
    buf = huge_page_buffer(sum((n + 63) // 64 * 64 for n in nbytes))  # each weight 64-byte aligned
    offset = 0
    for w, n in zip(linears, nbytes):
        view = buf[offset : offset + n].view(w.packed.dtype)
        view.copy_(w.packed)
        w.packed = view
        w.in_huge_pages = True
        offset += (n + 63) // 64 * 64
    release_freed_memory()  # the copies just dropped (and the plain weights packing replaced)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | native.PackedLinear,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + F.linear(x, weight, bias), whose rows do not depend on the number of rows in x (x: (M, in)).

    weight is a plain (out, in) tensor or one from pack_linear_weight / prepack_linear_weight. The kernel adds
    the residual in its epilogue, with the roundings of the unfused expression.
    """
    if isinstance(weight, native.PackedLinear):
        return weight(x, bias, residual)
    out = _linear(x, weight, bias)
    return out if residual is None else residual + out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    if m == 0:
        return x.new_zeros((0, weight.shape[0]))
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if uses_onednn(x.dtype):
        if m == 1:  # oneDNN's one-row kernels (a GEMV) sum in another order
            return torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, 1)), weight, bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    mp = invariant_rows(m, x.dtype)
    if mp == m:
        return F.linear(x, weight, bias)
    return F.linear(F.pad(x, (0, 0, 0, mp - m)), weight, bias)[:m]
