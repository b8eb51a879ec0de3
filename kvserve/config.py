"""EngineConfig: the one frozen dataclass that carries every engine knob.

Defaults and validation live here, so an invalid configuration fails at start with a message naming the knob.
Values discovered at run time (number of KV blocks, the EOS ids, the resolved dtype) are *not* written back
here; they are returned by the components that find them.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, fields

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _default_kv_cache_memory() -> int:
    """A sensible share of RAM for the KV pool: 10% of physical memory, capped at 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(64 << 20, min(4 << 30, total // 10))


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (numbers.Integral,),  # numpy integers too
    "float": (numbers.Real,),
    "bool": (bool,),
    "str": (str,),
}


def _check_type(name: str, annotation: str, value: object) -> None:
    """value against a field annotation such as 'int', 'float' or 'str | None' (bool is not an int here)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    allowed = [t for k in kinds if k in _TYPES for t in _TYPES[k]]
    if not allowed:
        return
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, tuple(allowed)):
        raise ValueError(f"{name} must be {annotation}, got {value!r}")
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine. Construct it once; it never changes afterwards."""

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None -> _default_kv_cache_memory()
    num_kv_blocks: int | None = None  # exact pool size; overrides kv_cache_memory (tests, benchmarks)
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64  # most requests running at once
    max_model_len: int | None = None  # None -> the model's context length
    long_prefill_token_threshold: int | None = None  # most prompt tokens one request may take per step
    enable_prefix_caching: bool = True
    eviction_policy: str = "lru"  # lru | lfu | cost-aware: which cached block leaves the pool first
    cpu_offload_gb: float = 0.0  # host-RAM tier for blocks evicted from the pool (GiB; 0 = none)
    kv_store: str | None = None  # persistent tier: PATH, disk:PATH or redis://HOST:PORT[/DB]
    kv_store_max_bytes: int | None = None  # bound of a disk store (LRU); None: until the disk is full
    seed: int = 0  # seed for requests that bring none
    max_logprobs: int = 20
    # Hybrid / recurrent models: where to snapshot recurrent state during prefill (see kvserve/recurrent/).
    checkpoint_policy: str = "none"  # none | every-block:B | balanced:M | sqrt | log | optimal:M
    checkpoint_memory: int | None = None  # bytes for state checkpoints; None -> a quarter of the KV budget
    # optimal:M's online learning (kvserve/recurrent/placement.py): re-solve every k observed overlap depths,
    # the histogram's decay per observation, and the J improvement a new placement must bring to be adopted.
    checkpoint_resolve_every: int = 32
    checkpoint_decay: float = 0.999
    checkpoint_switch_margin: float = 0.02

    def __post_init__(self) -> None:
        for f in fields(self):  # types first: "16" for block_size or "no" for a flag is a clear error, not a crash
            _check_type(f.name, str(f.type), getattr(self, f.name))
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        positive = ["block_size", "max_num_batched_tokens", "max_num_seqs"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["kv_cache_memory", "num_kv_blocks", "max_model_len", "long_prefill_token_threshold"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ValueError(f"block_size must be a power of two <= 256, got {self.block_size}")
        from kvserve.kv.eviction import POLICIES

        if self.eviction_policy not in POLICIES:
            raise ValueError(f"eviction_policy must be one of {sorted(POLICIES)}, got {self.eviction_policy!r}")
        if not self.cpu_offload_gb >= 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")
        store_kind = None if self.kv_store is None else kv_store_kind(self.kv_store)
        if self.kv_store is not None and store_kind is None:
            raise ValueError(f"kv_store must be PATH, disk:PATH or redis://HOST:PORT, got {self.kv_store!r}")
        if self.kv_store_max_bytes is not None:
            if self.kv_store_max_bytes < 1:
                raise ValueError(f"kv_store_max_bytes must be >= 1, got {self.kv_store_max_bytes}")
            if store_kind != "disk":
                raise ValueError("kv_store_max_bytes bounds a disk --kv-store; Redis is bounded by its maxmemory")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.checkpoint_memory is not None and self.checkpoint_memory < 0:
            raise ValueError(f"checkpoint_memory must be >= 0 when given, got {self.checkpoint_memory}")
        if self.checkpoint_resolve_every < 1:
            raise ValueError(f"checkpoint_resolve_every must be >= 1, got {self.checkpoint_resolve_every}")
        if not 0.0 < self.checkpoint_decay <= 1.0:
            raise ValueError(f"checkpoint_decay must be in (0, 1], got {self.checkpoint_decay}")
        if not 0.0 <= self.checkpoint_switch_margin < 1.0:
            raise ValueError(f"checkpoint_switch_margin must be in [0, 1), got {self.checkpoint_switch_margin}")
        self.placement_policy()  # a bad spec fails here, naming the choices

    def placement_policy(self):
        """A new PlacementPolicy for --checkpoint-policy and the learning knobs."""
        from kvserve.recurrent.placement import make_placement_policy

        return make_placement_policy(
            self.checkpoint_policy,
            resolve_every=self.checkpoint_resolve_every,
            decay=self.checkpoint_decay,
            switch_margin=self.checkpoint_switch_margin,
        )

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_memory if self.kv_cache_memory is not None else _default_kv_cache_memory()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def kv_store_kind(spec: str) -> str | None:
    """ "disk" for disk:PATH or a bare PATH, "redis" for redis://, rediss:// or unix://, None for anything else
    (the one place --kv-store specs are told apart: config validation and kvserve.kv.tiers.open_store)."""
    if spec.startswith("disk:"):
        return "disk" if len(spec) > len("disk:") else None
    if "://" in spec:
        return "redis" if spec.split("://", 1)[0] in ("redis", "rediss", "unix") else None
    return "disk" if spec else None


def parse_memory(text: str) -> int:
    """'4GiB', '512MB', '1.5G', '1000000' -> bytes."""
    s = text.strip().lower().replace("ib", "").replace("b", "")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 2GiB, 512MiB or a byte count") from None
