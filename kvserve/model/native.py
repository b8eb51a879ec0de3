"""kvserve's CPU kernels, built with the system C compiler at first use: fused paged attention
(csrc/paged_attention.c) and linear layers (csrc/linear.c).

The kernel reads K/V straight from the paged cache through the block tables (no gathered copy, no float32
copy of bf16 blocks) and computes every query row from its own inputs in one fixed order, so it is batch-
invariant by construction (see the C file). It runs on CPU when a C compiler with OpenMP is found and the
cache is float32 or bfloat16; kvserve/model/backends.py chooses it or the torch path in
kvserve/model/attention.py once per engine (EngineConfig.attention_backend). The two paths round
differently, so one engine never mixes them (a cached block written under one is read under the same one).

The linear kernel (csrc/linear.c) computes every output as one chain of fused multiply-adds over the input
features in order, so its rows are batch-invariant too, with no padding row: a batch-1 decode step streams
each weight once at the memory's speed. It needs AVX-512 (AVX512-BF16 for bfloat16); elsewhere, or with
linear_backend onednn, linears run on oneDNN (kvserve/model/invariant.py).

The shared object is cached under $KVSERVE_CACHE_DIR (default ~/.cache/kvserve), keyed by the source, the
compiler flags and the compiler; `-march=native` makes it specific to the machine that built it, and the CPU
flags are part of the key too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("paged_attention.c", "linear.c", "layer.c", "sample.c"))
HEADERS = (CSRC / "kvmath.h",)
ARITHMETIC = 1  # bump when the attention kernel's numbers change: cached KV from another version must not be read
LINEAR_ARITHMETIC = 1  # the same for the linear kernel and the fused layer's RMSNorm, RoPE and SwiGLU
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
TILE = 64  # prefill tokens per work item: the rows of a tile share every key and value block they load


@dataclass
class NativeMeta:
    """Per step: each sequence's block table and where its tokens sit in the flat batch."""

    tables: torch.Tensor  # (S, max_blocks) int32
    segs: torch.Tensor  # (S, 2) int32: first row, number of tokens
    positions: torch.Tensor  # (T,) int64, the same tensor as AttentionMetadata.positions


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or the build failed: logged once)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("no C compiler found: attention runs on the slower torch path, linears on oneDNN")
        return None
    try:
        return _build_and_load(cc)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("the CPU kernels are unavailable (%s): attention runs on the slower torch path", e)
        return None


def _build_and_load(cc: str) -> ctypes.CDLL | None:
    src = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + " ".join(CFLAGS + [cc, version, _cpu_flags()]).encode()).hexdigest()[:16]
    name = f"kvserve_native_{key}.so"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"kvserve-{os.getuid()}"):
        target = directory / name
        if target.exists():
            break
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue  # an unwritable home: try the temp directory
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            built = Path(tmp) / name
            cmd = [cc, *CFLAGS, "-o", str(built), *map(str, SOURCES)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                logger.warning("building the CPU kernels failed, using the torch path and oneDNN:\n%s", proc.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders each publish a complete file
        break
    else:
        logger.warning("no writable directory for the CPU kernels: attention runs on the torch path")
        return None
    lib = ctypes.CDLL(str(target))
    fn = lib.kvserve_paged_attention
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [ptr, ctypes.c_float, ptr, i32, ptr, i32, ptr, i32, ptr, ptr, i32, i32, i64, i32, i32, i32, i32]
    fn.restype = i32
    lib.kvserve_attention_features.restype = i32
    lib.kvserve_linear_features.restype = i32
    lib.kvserve_linear_panel_width.restype = i32
    if lib.kvserve_linear_panel_width() != NR:
        raise OSError(f"csrc/linear.c packs {lib.kvserve_linear_panel_width()}-column panels, native.py {NR}")
    for fn in (lib.kvserve_pack_f32, lib.kvserve_pack_bf16):
        fn.argtypes, fn.restype = [ptr, i64, i64, ptr], None
    for fn in (lib.kvserve_linear_f32, lib.kvserve_linear_bf16):
        fn.argtypes, fn.restype = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i32], None
    lib.kvserve_rmsnorm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, i32, i32]
    lib.kvserve_rmsnorm.restype = None
    lib.kvserve_llama_layer_scratch.argtypes = [i64, i64, i32, i32, i32, i64, i32]
    lib.kvserve_llama_layer_scratch.restype = i64
    f = ctypes.c_float
    lib.kvserve_llama_layers.argtypes = [i32, ptr, ptr, i64, i64, i32, f, i64, ptr, ptr, ptr, ptr, ptr, i64]
    lib.kvserve_llama_layers.argtypes += [ptr, i32, ptr, i32, i32, i32, i64, i32, i32, f, i32, i32, ptr]
    lib.kvserve_llama_layers.restype = i32
    lib.kvserve_layer_timing.argtypes, lib.kvserve_layer_timing.restype = [i32], None
    lib.kvserve_swiglu_panels.argtypes, lib.kvserve_swiglu_panels.restype = [i64], i64
    lib.kvserve_pack_swiglu.argtypes, lib.kvserve_pack_swiglu.restype = [i32, ptr, i64, i64, ptr], None
    lib.kvserve_linear_swiglu.argtypes = [i32, ptr, i64, i64, i64, ptr, i64, ptr, i32]
    lib.kvserve_linear_swiglu.restype = None
    lib.kvserve_linear_w.argtypes = [ptr, i32, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i32]
    lib.kvserve_linear_w.restype = i32
    lib.kvserve_q_panel_bytes.argtypes, lib.kvserve_q_panel_bytes.restype = [ptr, i64], i64
    lib.kvserve_q_rows.argtypes, lib.kvserve_q_rows.restype = [ptr, i64, ptr, i64, i32, ptr, i32], None
    lib.kvserve_argmax_rows.argtypes, lib.kvserve_argmax_rows.restype = [ptr, i64, i64, ptr, i32], None
    lib.kvserve_layer_section_time.argtypes, lib.kvserve_layer_section_time.restype = [i32], ctypes.c_double
    return lib


def kernel_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the attention kernel can run for this device and cache dtype (it built, CPU, f32/bf16)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and load() is not None


def kernel_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the linear kernel can run for this device and dtype (it built with AVX-512 for the dtype)."""
    bit = {torch.float32: 1, torch.bfloat16: 2}.get(dtype, 0)
    if device.type != "cpu" or not bit:
        return False
    lib = load()
    return lib is not None and bool(lib.kvserve_linear_features() & bit)


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """The `auto` choice for attention: the kernel where it runs, unless KVSERVE_ATTENTION=torch
    (kvserve/model/backends.py resolves it once per engine)."""
    return os.environ.get("KVSERVE_ATTENTION", "native") != "torch" and kernel_attention_available(device, dtype)


def linear_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """The `auto` choice for linear layers: the kernel where it runs, unless KVSERVE_LINEAR=onednn."""
    return os.environ.get("KVSERVE_LINEAR", "native") != "onednn" and kernel_linear_available(device, dtype)


NR = 48  # output columns per packed panel (csrc/linear.c)


class PackedLinear:
    """A (out, in) weight in the linear kernel's panel layout (from pack_linear).

    swiglu=True packs a [gate; up] weight (2 * I, in) for the SwiGLU epilogue: calling it returns
    act = silu(x gate^T) * (x up^T), (M, I), with the roundings of the two steps (csrc/linear.c).
    """

    def __init__(self, weight: torch.Tensor, swiglu: bool = False):
        lib = load()
        assert lib is not None and weight.dim() == 2 and weight.device.type == "cpu"
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.swiglu = swiglu
        n, k = self.shape
        if self.dtype == torch.bfloat16 and k % 2:
            raise ValueError("bfloat16 linears need an even number of input features")
        if swiglu and n % 2:
            raise ValueError(f"a SwiGLU pack needs [gate; up] rows, got {n}")
        weight = weight.contiguous()
        panels = lib.kvserve_swiglu_panels(n // 2) if swiglu else (n + NR - 1) // NR
        self.packed = torch.empty(panels * NR * k, dtype=weight.dtype)
        if swiglu:
            bf = int(self.dtype == torch.bfloat16)
            lib.kvserve_pack_swiglu(bf, weight.data_ptr(), n // 2, k, self.packed.data_ptr())
        else:
            pack = lib.kvserve_pack_f32 if self.dtype == torch.float32 else lib.kvserve_pack_bf16
            pack(weight.data_ptr(), n, k, self.packed.data_ptr())
        self._call = lib.kvserve_linear_f32 if self.dtype == torch.float32 else lib.kvserve_linear_bf16
        self._swiglu = lib.kvserve_linear_swiglu

    def descriptor(self) -> torch.Tensor:
        """csrc/linear.c's WeightDesc of these panels (int64: kind, address, bits, group, offset, has_bias, f16),
        rebuilt if the panels moved (place_in_huge_pages); the fused layer reads it by address."""
        if getattr(self, "_desc", None) is None or int(self._desc[1]) != self.packed.data_ptr():
            self._desc = torch.tensor([self._kind, self.packed.data_ptr(), *self._format], dtype=torch.int64)
        return self._desc

    _kind, _format = 0, (0, 0, 0, 0, 0)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def element_size(self) -> int:
        return self.packed.element_size()

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """residual + x @ weight.T + bias (a SwiGLU pack: the activation); x: (M, in), unit column stride, in
        the weight's dtype."""
        n, k = self.shape
        if x.dtype != self.dtype or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
            raise ValueError(f"linear of a {tuple(x.shape)} {x.dtype} input with a {self.shape} {self.dtype} weight")
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for a linear with {n} outputs")
        if self.swiglu and (bias is not None or residual is not None):
            raise ValueError("a SwiGLU-packed linear takes no bias or residual")
        if x.stride(1) != 1:
            x = x.contiguous()
        m, threads = x.shape[0], torch.get_num_threads()
        if self.swiglu:
            act = torch.empty((m, n // 2), dtype=x.dtype)
            if m:
                bf, w = int(x.dtype == torch.bfloat16), self.packed.data_ptr()
                self._swiglu(bf, x.data_ptr(), x.stride(0), m, k, w, n // 2, act.data_ptr(), threads)
            return act
        y = torch.empty((m, n), dtype=x.dtype)
        if bias is not None:
            bias = bias.to(x.dtype).contiguous()
        if residual is not None:
            residual = residual.to(x.dtype).contiguous()
            assert residual.shape == (m, n)
        if m:
            self._call(
                x.data_ptr(),
                x.stride(0),
                m,
                k,
                self.packed.data_ptr(),
                n,
                None if bias is None else bias.data_ptr(),
                None if residual is None else residual.data_ptr(),
                y.data_ptr(),
                threads,
            )
        return y


class QuantLinear(PackedLinear):
    """A linear whose weight stays quantized as its GGUF file stores it (kvserve/model/quant.py's panels),
    dequantized inside the kernel: the outputs of a PackedLinear of the dequantized weight, bit for bit.
    dtype is the model's (activations and outputs); rows(ids) reads rows of the weight (an embedding table)."""

    def __init__(self, parts: list, dtype: torch.dtype, swiglu: bool = False):
        from kvserve.model import quant

        lib = load()
        assert lib is not None and dtype in (torch.float32, torch.bfloat16)
        data, fmt, self.shape = quant.pack(parts, swiglu)
        self.dtype, self.swiglu = dtype, swiglu
        n, k = self.shape
        if dtype == torch.bfloat16 and k % 2:
            raise ValueError("bfloat16 linears need an even number of input features")
        self.packed = torch.from_numpy(data)
        self._kind = 1
        self._format = (fmt.bits, fmt.group, fmt.offset, int(fmt.has_bias), int(fmt.f16))
        self.format = fmt
        panels = lib.kvserve_swiglu_panels(n // 2) if swiglu else (n + NR - 1) // NR
        assert self.packed.numel() == panels * lib.kvserve_q_panel_bytes(self.descriptor().data_ptr(), k)
        self._lib = lib

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, k = self.shape
        if x.dtype != self.dtype or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
            raise ValueError(f"linear of a {tuple(x.shape)} {x.dtype} input with a {self.shape} {self.dtype} weight")
        if self.swiglu and (bias is not None or residual is not None):
            raise ValueError("a SwiGLU-packed linear takes no bias or residual")
        if x.stride(1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        out = torch.empty((m, n // 2 if self.swiglu else n), dtype=x.dtype)
        if bias is not None:
            bias = bias.to(x.dtype).contiguous()
            assert bias.shape == (n,)
        if residual is not None:
            residual = residual.to(x.dtype).contiguous()
            assert residual.shape == (m, n)
        rc = self._lib.kvserve_linear_w(
            self.descriptor().data_ptr(),
            int(x.dtype == torch.bfloat16),
            x.data_ptr(),
            x.stride(0),
            m,
            k,
            n,
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            out.data_ptr(),
            n // 2 if self.swiglu else 0,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("the linear kernel could not allocate its scratch memory")
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight (an embedding lookup), (len(ids), in) in the model dtype."""
        assert not self.swiglu
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty((ids.numel(), self.shape[1]), dtype=self.dtype)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise IndexError(f"token id out of range for an embedding of {self.shape[0]} rows")
        bf = int(self.dtype == torch.bfloat16)
        desc = self.descriptor().data_ptr()
        threads = torch.get_num_threads()
        self._lib.kvserve_q_rows(desc, self.shape[1], ids.data_ptr(), ids.numel(), bf, out.data_ptr(), threads)
        return out


def build_meta(tables: list[list[int]], counts: list[int], positions: torch.Tensor, device: torch.device) -> NativeMeta:
    """tables[s], counts[s]: block table and new-token count of the s-th sequence, in flat-batch row order."""
    width = max((len(t) for t in tables), default=1) or 1
    padded = [t + [0] * (width - len(t)) for t in tables]
    starts, row = [], 0
    for n in counts:
        starts.append([row, n])
        row += n
    return NativeMeta(
        tables=torch.tensor(padded, dtype=torch.int32, device=device),
        segs=torch.tensor(starts, dtype=torch.int32, device=device).view(-1, 2),
        positions=positions,
    )


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: NativeMeta, scale: float) -> torch.Tensor:
    """q: (T, heads, head_dim) -> (T, heads, head_dim) in q's dtype; K/V already written to kv_layer."""
    lib = load()
    assert lib is not None
    # the kernel indexes raw memory: the layouts it assumes, checked (cheap) rather than trusted
    assert kv_layer.is_contiguous() and meta.positions.dtype == torch.int64 and meta.positions.is_contiguous()
    T, H, hd = q.shape
    _, kvh, nb, bs, _ = kv_layer.shape
    q = q.to(kv_layer.dtype).contiguous()  # the kernel scales it (float32 math) or, bf16 on AVX512-BF16, the dot
    out = torch.empty((T, H, hd), dtype=torch.float32, device=q.device)
    rc = lib.kvserve_paged_attention(
        q.data_ptr(),
        scale,
        kv_layer.data_ptr(),
        int(kv_layer.dtype == torch.bfloat16),
        meta.tables.data_ptr(),
        meta.tables.shape[1],
        meta.segs.data_ptr(),
        meta.segs.shape[0],
        meta.positions.data_ptr(),
        out.data_ptr(),
        H,
        kvh,
        nb,
        bs,
        hd,
        TILE,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("attention kernel could not allocate its scratch memory")
    return out.to(q.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused layer's RMSNorm (csrc/layer.c) of x's rows: (T, D) -> (T, D), in x's dtype."""
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    lib = load()
    assert lib is not None and x.dim() == 2 and weight.shape == (x.shape[1],)
    T, D = x.shape
    bf = int(x.dtype == torch.bfloat16)
    lib.kvserve_rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), T, D, eps, bf, torch.get_num_threads())
    return out


def argmax_rows(logits: torch.Tensor) -> list[int] | None:
    """torch.argmax(logits, dim=-1).tolist() for (rows, vocab) float32 CPU logits, rows in parallel
    (csrc/sample.c); None where the kernels are unavailable, the logits are elsewhere, or a row holds a NaN."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    lib = load()
    if lib is None:
        return None
    rows, n = logits.shape
    if n == 0:
        return None
    logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64)
    lib.kvserve_argmax_rows(logits.data_ptr(), rows, n, out.data_ptr(), torch.get_num_threads())
    ids = out.tolist()
    return None if -1 in ids else ids
