"""kvserve's fused CPU attention kernel (csrc/paged_attention.c), built with the system C compiler at first use.

The kernel reads K/V straight from the paged cache through the block tables (no gathered copy, no float32
copy of bf16 blocks) and computes every query row from its own inputs in one fixed order, so it is batch-
invariant by construction (see the C file). It is chosen once per process: on CPU when a C compiler with
OpenMP is found and the cache is float32 or bfloat16, unless KVSERVE_ATTENTION=torch; everything else runs
the torch path in kvserve/model/attention.py. The two paths round differently, so one process never mixes
them (a cached block written under one is read under the same one).

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

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
ARITHMETIC = 1  # bump when the kernel's numbers change: cached KV from another version must not be read
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
    """The compiled kernel, or None (not wanted, no compiler, or the build failed: logged once)."""
    if os.environ.get("KVSERVE_ATTENTION", "native") == "torch":
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("no C compiler found: attention runs on the slower torch path")
        return None
    try:
        return _build_and_load(cc)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("the attention kernel is unavailable (%s): attention runs on the slower torch path", e)
        return None


def _build_and_load(cc: str) -> ctypes.CDLL | None:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + " ".join(CFLAGS + [cc, version, _cpu_flags()]).encode()).hexdigest()[:16]
    name = f"kvserve_attention_{key}.so"
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
            cmd = [cc, *CFLAGS, "-o", str(built), str(SOURCE)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                logger.warning("building the attention kernel failed, using the torch path:\n%s", proc.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent builders each publish a complete file
        break
    else:
        logger.warning("no writable directory for the attention kernel: attention runs on the torch path")
        return None
    lib = ctypes.CDLL(str(target))
    fn = lib.kvserve_paged_attention
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [ptr, ctypes.c_float, ptr, i32, ptr, i32, ptr, i32, ptr, ptr, i32, i32, i64, i32, i32, i32, i32]
    fn.restype = i32
    lib.kvserve_attention_features.restype = i32
    return lib


def arithmetic_tag(device: torch.device, dtype: torch.dtype) -> str:
    """Names the attention arithmetic KV blocks are computed with, for keys shared across processes.

    KV at layer > 0 depends on the attention of the layers below, and the two paths (and the kernel's bf16
    variants) round differently: replicas sharing a KV store must only exchange blocks made the same way.
    """
    if not enabled(device, dtype):
        return f"torch-{device.type}"
    lib = load()
    dp = dtype == torch.bfloat16 and lib is not None and lib.kvserve_attention_features() & 1
    return f"k{ARITHMETIC}" + ("-dpbf16" if dp else "")


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention for this device and cache dtype runs on the kernel (a per-process choice)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and load() is not None


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
