"""EngineConfig: the one frozen dataclass that carries every engine knob, and the one place flags are declared.

Defaults, help texts and validation live here: `kvserve.cli` derives every engine flag (name, type, default,
choices, help) from these fields, so a knob is written once. Types are checked by pydantic (strict: "16" is
not a block size, "no" is not a flag); ranges and relations in __post_init__, each error naming its knob.
Values discovered at run time (number of KV blocks, the EOS ids, the resolved dtype and backends) are *not*
written back here; they are returned by the components that find them.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import typing
from dataclasses import dataclass, fields

from pydantic import ConfigDict, TypeAdapter, ValidationError

from kvserve.kv.eviction import POLICIES
from kvserve.spec.drafter import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "native", "torch")
LINEAR_BACKENDS = ("auto", "native", "onednn")
WEIGHTS = ("auto", "dequantize")


def _default_kv_cache_memory() -> int:
    """A sensible share of RAM for the KV pool: 10% of physical memory, capped at 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(64 << 20, min(4 << 30, total // 10))


def knob(default: object, help: str, *, choices: tuple[str, ...] | None = None, memory: bool = False):
    """A config field with what its CLI flag needs: help text, choices, and whether it parses sizes (2GiB)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "memory": memory})


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine. Construct it once; it never changes afterwards."""

    model: str = knob("smollm2-135m", "model: a bundled name, a GGUF file or a Hugging Face folder")
    dtype: str = knob("auto", "weights, activations and KV cache dtype", choices=DTYPES)
    device: str = knob("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    attention_backend: str = knob(
        "auto",
        "attention: kvserve's CPU kernel (native) or torch; auto = $KVSERVE_ATTENTION, else native where it builds",
        choices=ATTENTION_BACKENDS,
    )
    linear_backend: str = knob(
        "auto",
        "CPU linear layers: kvserve's kernel (native) or oneDNN; auto = $KVSERVE_LINEAR, else native where it builds",
        choices=LINEAR_BACKENDS,
    )
    weights: str = knob(
        "auto",
        "GGUF quantized weights (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): auto keeps them as stored where kvserve's linear "
        "kernel runs (the same outputs, bit for bit, in a fraction of the memory); dequantize expands them at load",
        choices=WEIGHTS,
    )
    block_size: int = knob(16, "tokens per KV block (a power of two <= 256)")
    kv_cache_memory: int | None = knob(
        None, "bytes for the KV pool, e.g. 2GiB (default: 10%% of RAM, at most 4 GiB)", memory=True
    )
    num_kv_blocks: int | None = knob(None, "exact KV pool size in blocks; overrides --kv-cache-memory")
    max_num_batched_tokens: int = knob(2048, "token budget of one step (prefill chunks + decodes)")
    max_num_seqs: int = knob(64, "most requests running at once")
    max_model_len: int | None = knob(None, "context length (default: the model's)")
    long_prefill_token_threshold: int | None = knob(None, "most prompt tokens one request may compute per step")
    enable_prefix_caching: bool = knob(True, "reuse the KV of cached prompt prefixes")
    eviction_policy: str = knob(
        "lru",
        "which cached KV block leaves the pool first (leaves of the prefix tree always go first)",
        choices=tuple(POLICIES),
    )
    cpu_offload_gb: float = knob(0.0, "host-RAM tier for KV blocks evicted from the pool (GiB; 0 = none)")
    kv_store: str | None = knob(
        None,
        "persistent KV tier shared across restarts/replicas: a directory (PATH or disk:PATH) or redis://127.0.0.1:6379",
    )
    kv_store_max_bytes: int | None = knob(
        None,
        "bound of a disk --kv-store, e.g. 50GiB (least recently used files go first; default: until full)",
        memory=True,
    )
    seed: int = knob(0, "sampling seed of requests that bring none")
    speculative: str | None = knob(
        None,
        "speculative decoding, tokens unchanged: ngram:K (drafts from the request's own text) or suffix:K "
        "(also from earlier requests' text, per cache salt); K drafts per step at most",
    )
    max_logprobs: int = knob(20, "most logprobs / prompt_logprobs a request may ask for")
    # Hybrid / recurrent models: where to snapshot recurrent state during prefill (see kvserve/recurrent/).
    checkpoint_policy: str = knob(
        "none",
        "hybrid/recurrent models: where prefill snapshots recurrent state for prefix reuse: "
        "none | every-block:B | balanced:M | sqrt | log | optimal:M",
    )
    checkpoint_memory: int | None = knob(
        None,
        "bytes for recurrent-state checkpoints, e.g. 1GiB (default: a quarter of --kv-cache-memory)",
        memory=True,
    )
    # optimal:M's online learning (kvserve/recurrent/placement.py): re-solve every k observed overlap depths,
    # the histogram's decay per observation, and the J improvement a new placement must bring to be adopted.
    checkpoint_resolve_every: int = knob(32, "optimal:M: re-solve the placement every k observed overlap depths")
    checkpoint_decay: float = knob(0.999, "optimal:M: histogram decay per observation, in (0, 1]")
    checkpoint_switch_margin: float = knob(
        0.02, "optimal:M: adopt a new placement only if it lowers expected recompute by more than this share"
    )

    def __post_init__(self) -> None:
        self._check_types()  # first: "16" for block_size or "no" for a flag is a clear error, not a crash
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
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
        if self.speculative is not None:
            SpeculativeConfig.parse(self.speculative)

    def _check_types(self) -> None:
        """Each field against its annotation, by pydantic in strict mode (no str -> int, bool is not an int,
        no inf/nan); numpy integers and floats are taken as the Python numbers they are."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
                value = int(value)
            elif isinstance(value, numbers.Real) and not isinstance(value, int | float):
                value = float(value)
            try:
                checked = _adapters()[f.name].validate_python(value)
            except ValidationError as e:
                reason = e.errors()[0]["msg"].lower()
                raise ValueError(f"{f.name} must be {_type_names()[f.name]} ({reason}), got {value!r}") from None
            object.__setattr__(self, f.name, checked)  # frozen; int -> float for float fields

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


_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def _hints() -> dict[str, object]:
    return typing.get_type_hints(EngineConfig)


_ADAPTERS: dict[str, TypeAdapter] = {}


def _adapters() -> dict[str, TypeAdapter]:
    """One pydantic TypeAdapter per field, built once from the real annotations (not their strings)."""
    if not _ADAPTERS:
        for name, hint in _hints().items():
            _ADAPTERS[name] = TypeAdapter(hint, config=_STRICT)
    return _ADAPTERS


def _type_names() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(EngineConfig)}


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
