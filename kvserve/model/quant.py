"""GGUF quantized weights kept as stored and repacked for kvserve's linear kernel (csrc/linear.c).

A GGUF tensor of type Q8_0, Q4_0, Q4_1, Q4_K or Q6_K is read as its raw blocks (:class:`QuantTensor`), decoded
into integer codes ``q`` with per-group scales ``S`` and offsets ``B`` such that gguf-py's dequantizer
computes every weight as ``w = S * q`` then ``+ B``, each rounded in float32 (:func:`decode`), and packed into
the kernel's 48-column panels (:func:`pack`): the 4-bit types as nibbles, the 8-bit and 6-bit ones as bytes.
The kernel rebuilds ``w`` with the same two float32 operations (and the bf16 rounding of a bf16 model), so a
quantized model's outputs have the bits of the dequantized one's.

Tensors fused into one linear (q/k/v, gate/up) may differ in type (a Q4_K_M file keeps v in Q6_K): they are
packed in the narrowest format that holds them all (:func:`join`), exactly.

What the packs cost against the file: Q8_0, Q4_0 and Q4_1 keep their float16 scales and take exactly the
file's bytes (plus zero columns filling a last partial panel); the K-quants store the products of their
two-level scales in float32 (Q4_K: 0.75 bytes per weight vs the file's 0.5625; Q6_K: 1.25 vs 0.82, its 6-bit
codes in bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NR = 48  # output columns per panel (csrc/linear.c)
HALF = NR // 2


def native_types() -> dict:
    """GGML types the kernel runs as stored -> (bits, group, offset, has_bias, f16 scales)."""
    from gguf import GGMLQuantizationType as Q

    return {
        Q.Q8_0: (8, 32, 0, False, True),
        Q.Q4_0: (4, 32, 8, False, True),
        Q.Q4_1: (4, 32, 0, True, True),
        Q.Q4_K: (4, 32, 0, True, False),
        Q.Q6_K: (8, 16, 0, False, False),
    }


@dataclass(frozen=True)
class Format:
    bits: int  # 4: nibbles, value = nibble - offset; 8: signed bytes
    group: int  # input features per scale
    offset: int
    has_bias: bool
    f16: bool  # scales (and offsets) exactly representable in float16

    @property
    def scale_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.f16 else np.float32)


@dataclass
class QuantTensor:
    """A 2-D GGUF tensor's raw blocks, rows in Hugging Face order: (rows, row bytes) uint8."""

    raw: np.ndarray
    kind: object  # gguf.GGMLQuantizationType
    shape: tuple[int, int]  # (rows, input features)

    def dequantize(self) -> torch.Tensor:
        """gguf-py's float32 values: the dequantized model's weight (the reference)."""
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(self.raw, self.kind)).reshape(self.shape)


@dataclass
class Decoded:
    codes: np.ndarray  # (N, K): uint8 nibbles (4-bit) or int8 values (8-bit)
    scales: np.ndarray  # (N, K / group) float32
    bias: np.ndarray | None  # (N, K / group) float32
    fmt: Format


def decode(t: QuantTensor) -> Decoded:
    """Codes, scales and offsets of ``t`` with ``gguf.quants.dequantize(t) == S * q (+ B)`` in float32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import Q4_K

    fmt = Format(*native_types()[t.kind])
    n, k = t.shape
    size = GGML_QUANT_SIZES[t.kind][1]
    blocks = np.ascontiguousarray(t.raw).reshape(-1, size)
    nb = blocks.shape[0]

    def f16(col: int) -> np.ndarray:
        return blocks[:, col : col + 2].copy().view(np.float16).astype(np.float32)

    bias = None
    if t.kind == Q.Q8_0:
        scales, codes = f16(0), blocks[:, 2:].view(np.int8)
    elif t.kind in (Q.Q4_0, Q.Q4_1):
        qs = blocks[:, 4:] if t.kind == Q.Q4_1 else blocks[:, 2:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # elements 0-15 low nibbles, 16-31 high
        scales = f16(0)
        if t.kind == Q.Q4_1:
            bias = f16(2)
    elif t.kind == Q.Q4_K:
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
        scales = f16(0) * sc.astype(np.float32)  # (nb, 8): gguf-py's d * sc, rounded in float32
        bias = -(f16(2) * mn.astype(np.float32))  # - dmin * m: d * q - dm == d * q + (-dm)
        qs = blocks[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(nb, 256)  # per 64: 32 low nibbles, then the same bytes' high ones
    else:  # Q6_K
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        scales = f16(208) * sc  # (nb, 16)
        lo = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        codes = (lo.reshape(nb, 2, 128) | (hi.reshape(nb, 2, 128) << 4)).astype(np.int8) - np.int8(32)
    return Decoded(
        codes=np.ascontiguousarray(codes).reshape(n, k),
        scales=np.ascontiguousarray(scales, dtype=np.float32).reshape(n, k // fmt.group),
        bias=None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(n, k // fmt.group),
        fmt=fmt,
    )


def join(formats: list[Format]) -> Format:
    """The narrowest format every one of ``formats`` converts to exactly."""
    first = formats[0]
    if all(f == first for f in formats):
        return first
    four = all(f.bits == 4 and f.offset == first.offset for f in formats)
    return Format(
        bits=4 if four else 8,
        group=min(f.group for f in formats),
        offset=first.offset if four else 0,
        has_bias=any(f.has_bias for f in formats),
        f16=all(f.f16 for f in formats),
    )


def convert(d: Decoded, fmt: Format) -> Decoded:
    """``d`` in ``fmt`` (from :func:`join`), the same weights."""
    codes, scales, bias = d.codes, d.scales, d.bias
    if fmt.bits == 8 and d.fmt.bits == 4:
        codes = codes.astype(np.int8) - np.int8(d.fmt.offset)
    if fmt.group != d.fmt.group:  # a scale shared by `repeat` smaller groups
        repeat = d.fmt.group // fmt.group
        scales = np.repeat(scales, repeat, axis=1)
        bias = None if bias is None else np.repeat(bias, repeat, axis=1)
    if fmt.has_bias and bias is None:
        bias = np.full_like(scales, -0.0)  # x + (-0.0) == x for every x, signed zeros included
    return Decoded(codes, scales, bias, fmt)


def source_rows(n: int, swiglu: bool) -> np.ndarray:
    """Row of W for each packed column (-1: a zero column), as csrc/linear.c's source_row: W's rows in panels
    of 48, or for a SwiGLU pack of W = [gate; up] each panel's 24 gate features then the same features' up rows."""
    if not swiglu:
        panels = -(-n // NR)
        rows = np.arange(panels * NR)
        return np.where(rows < n, rows, -1)
    inter = n // 2
    panels = -(-inter // HALF)
    col = np.arange(panels * NR)
    f = col // NR * HALF + col % NR % HALF
    return np.where(f >= inter, -1, np.where(col % NR < HALF, f, inter + f))


def pack(parts: list[QuantTensor], swiglu: bool = False) -> tuple[np.ndarray, Format, tuple[int, int]]:
    """The rows of ``parts`` (fused in order) as the kernel's quantized panels: (bytes, format, (N, K)).
    Decoded and packed a band of panels at a time, so the transient copies are a band's, not the tensor's."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        raise ValueError(f"cannot fuse quantized tensors of {[p.shape for p in parts]}")
    fmt = join([Format(*native_types()[p.kind]) for p in parts])
    starts = np.cumsum([0] + [p.shape[0] for p in parts])
    n = int(starts[-1])
    rows = source_rows(n, swiglu)
    panels = len(rows) // NR
    record = NR * fmt.scale_dtype.itemsize * (1 + fmt.has_bias) + NR * fmt.group * fmt.bits // 8
    panel_bytes = k // fmt.group * record
    out = np.empty(panels * panel_bytes, dtype=np.uint8)
    band = max(1, (4 << 20) // max(k * NR, 1))  # panels per band: about 4 M weights
    for p0 in range(0, panels, band):
        p1 = min(panels, p0 + band)
        out[p0 * panel_bytes : p1 * panel_bytes] = _pack_band(parts, starts, fmt, rows[p0 * NR : p1 * NR], k)
    return out, fmt, (n, k)


def _pack_band(parts: list[QuantTensor], starts: np.ndarray, fmt: Format, rows: np.ndarray, k: int) -> np.ndarray:
    """Packed bytes of the panels whose columns come from fused rows ``rows`` (-1: zero column)."""
    g, groups, panels = fmt.group, k // fmt.group, len(rows) // NR
    codes = np.zeros((len(rows), k), dtype=np.int8 if fmt.bits == 8 else np.uint8)
    scales = np.zeros((len(rows), groups), dtype=np.float32)
    bias = np.zeros((len(rows), groups), dtype=np.float32) if fmt.has_bias else None
    for i, part in enumerate(parts):  # each part's rows this band needs, decoded as one slice
        mine = np.nonzero((rows >= starts[i]) & (rows < starts[i + 1]))[0]
        if not len(mine):
            continue
        local = rows[mine] - starts[i]
        lo, hi = int(local.min()), int(local.max()) + 1
        d = convert(decode(QuantTensor(part.raw[lo:hi], part.kind, (hi - lo, k))), fmt)
        codes[mine], scales[mine] = d.codes[local - lo], d.scales[local - lo]
        if bias is not None:
            bias[mine] = d.bias[local - lo]
    sdt = fmt.scale_dtype
    fields = [scales.astype(sdt).reshape(panels, NR, groups).transpose(0, 2, 1).copy().view(np.uint8)]
    if bias is not None:
        fields.append(bias.astype(sdt).reshape(panels, NR, groups).transpose(0, 2, 1).copy().view(np.uint8))
    c = codes.reshape(panels, NR, groups, g).transpose(0, 2, 3, 1)  # (panels, groups, g, 48)
    if fmt.bits == 4:
        c = (c[:, :, 0::2] | (c[:, :, 1::2] << 4)).reshape(panels, groups, g // 2 * NR)
    else:
        c = c.view(np.uint8).reshape(panels, groups, g * NR)
    fields = [f.reshape(panels, groups, -1) for f in fields] + [c]
    return np.concatenate(fields, axis=2).reshape(-1)
