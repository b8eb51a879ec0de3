"""Device and dtype resolution: `auto` picks CUDA when present, and bfloat16 where it is multiplied natively."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512 BF16: torch's bf16 GEMM runs on dedicated instructions there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":  # bf16 where the GPU multiplies it natively (Ampere and later), else float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Stop glibc from handing freed tensor memory back to the kernel between steps (CPU only; idempotent).

    A step allocates the same multi-megabyte temporaries again and again (gathered K/V, scores, GEMM
    outputs). With glibc's defaults each one above the dynamic mmap threshold, or left at the top of the heap
    past the trim threshold, goes back to the kernel when freed and returns as fresh zeroed pages. Measured
    on a bfloat16 batch-8 decode step over 1,000-token contexts (2-core EPYC): the K/V gather fell from 1.6
    to 0.8 ms per layer and the step from 109 to 84 ms with these settings. They keep allocations up to
    32 MiB in the heap and the heap from shrinking; the KV pool itself (one large tensor) is still mapped on
    its own. PyTorch's CPU tuning guides get the same effect by preloading jemalloc or tcmalloc.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30) and mallopt(m_top_pad, 64 << 20)
    if not ok:
        logger.debug("mallopt refused the allocator settings; keeping glibc defaults")
    return bool(ok)


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel once (glibc's malloc_trim; CPU only; best effort).

    keep_freed_memory_mapped keeps freed blocks in the heap for the next step's temporaries; after loading,
    the freed blocks are the weights' plain and packed copies the model replaced (hundreds of MB), which no
    step will reuse. Measured on the bundled model with a 256 MiB KV pool, resident memory after loading:
    1,357 MiB against 1,582 without the trim (bf16), 1,556 against 2,024 MiB (float32).
    """
    malloc_trim = _glibc_function("malloc_trim")
    return bool(malloc_trim(0)) if malloc_trim is not None else False  # not glibc: nothing to trim


def _glibc_function(name: str):
    """A function of the C library (glibc's allocator knobs), or None where the library lacks it."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


HUGE_PAGE = 2 << 20  # x86-64 transparent huge page


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed CPU uint8 buffer of nbytes, 2 MiB-aligned, that the kernel backs with transparent huge pages.

    With THP in `madvise` mode (the common default) anonymous memory gets 4 KiB pages unless asked. The KV
    pool is read block by block from all over a multi-GB buffer every step (torch's own switch,
    THP_MEM_ALLOC_ENABLE=1, must be set before torch allocates anything, so a library cannot use it). The
    buffer is its own anonymous mapping, so its pages are fresh (malloc could hand back heap memory faulted in
    long ago, which the advice no longer changes). Best effort: where THP is off this is an ordinary buffer.
    """
    size = nbytes + HUGE_PAGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            logger.debug("madvise(MADV_HUGEPAGE) failed: %s", e)
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to the mapping
    start = -buf.data_ptr() % HUGE_PAGE
    return buf[start : start + nbytes]
