"""From an EngineConfig to the engine's parts: the model, its KV pool sized to the memory budget, the
scheduler, the model runner, and for hybrid models the recurrent state with its checkpoint store and
placement policy. Values found here (number of blocks, dtype, backends) are returned, never written back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvserve.config import EngineConfig
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.kv.eviction import make_policy, recompute_cost
from kvserve.kv.tiers import TieredCache, open_store
from kvserve.model.backends import Backends, resolve_backends
from kvserve.model.block_io import TorchBlockIO
from kvserve.model.config import ModelConfig
from kvserve.model.device import keep_freed_memory_mapped, resolve_device, resolve_dtype
from kvserve.model.families import attention_kernel_gaps
from kvserve.model.fingerprint import model_fingerprint
from kvserve.model.hybrid import HybridModel
from kvserve.model.hybrid_runner import HybridModelRunner
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import LoadedModel
from kvserve.model.runner import ModelRunner, kv_bytes_per_block
from kvserve.recurrent.checkpoints import CheckpointStore
from kvserve.recurrent.manager import RecurrentCacheManager
from kvserve.recurrent.placement import NoCheckpoints
from kvserve.recurrent.state_pool import RecurrentStatePool, state_bytes_per_slot
from kvserve.scheduler import Scheduler, SchedulerLimits

log = logging.getLogger(__name__)

# A purely recurrent model's blocks hold no KV, only prefix-cache addresses (for state checkpoints).
_RECURRENT_ONLY_BLOCKS = 16384


@dataclass
class EngineParts:
    device: torch.device
    dtype: torch.dtype
    backends: Backends
    max_model_len: int
    num_blocks: int
    model: LlamaModel | HybridModel
    pool: BlockPool
    kv: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    recurrent: RecurrentCacheManager | None  # hybrid models


def build_parts(config: EngineConfig, loaded: LoadedModel) -> EngineParts:
    mc = loaded.config
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory_mapped()
    dtype = resolve_dtype(config.dtype, device)
    model_max = mc.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length {model_max}")
    max_model_len = config.max_model_len or model_max
    gaps = attention_kernel_gaps(mc, max_model_len)  # e.g. sliding windows: attention on the torch path
    backends = resolve_backends(device, dtype, config.attention_backend, config.linear_backend, gaps)
    per_block = kv_bytes_per_block(mc, config.block_size, dtype)
    num_blocks = _num_blocks(config, mc, per_block, dtype, max_model_len)
    if mc.is_hybrid:
        model = HybridModel(mc, loaded.weights, dtype, device, max_model_len, backends)
    else:
        model = LlamaModel(mc, loaded.weights, dtype, device, max_model_len, backends, config.weights == "auto")
        if config.weights == "auto" and not model.quantized and getattr(loaded.weights, "has_quantized", False):
            log.info("weights: quantized tensors dequantized at load (kvserve's linear kernel does not run here)")
    cost_args = {"cost": _recompute_cost(mc, config.block_size), "block_bytes": max(per_block, 1)}
    policy = make_policy(config.eviction_policy, **(cost_args if config.eviction_policy == "cost-aware" else {}))
    pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching, policy=policy)
    kv = KVCacheManager(
        pool, config.block_size, enable_caching=config.enable_prefix_caching, window=release_window(model)
    )
    limits = SchedulerLimits(config.max_num_batched_tokens, config.max_num_seqs, config.long_prefill_token_threshold)
    scheduler = Scheduler(limits, kv)
    recurrent = None
    if mc.is_hybrid:  # recurrent state slots, checkpoints, scheduler hooks
        recurrent = _recurrent_manager(config, model)
        scheduler.recurrent = recurrent
        states = (recurrent.pool.conv, recurrent.pool.ssm)
        runner: ModelRunner = HybridModelRunner(model, num_blocks, config.block_size, states)
    else:
        if config.checkpoint_policy.strip().lower() != "none" or config.checkpoint_memory is not None:
            log.warning("checkpoint_policy / checkpoint_memory apply to hybrid and recurrent models; ignored here")
        runner = ModelRunner(model, num_blocks, config.block_size)
    return EngineParts(
        device, dtype, backends, max_model_len, num_blocks, model, pool, kv, scheduler, runner, recurrent
    )


def release_window(model: LlamaModel | HybridModel) -> int | None:
    """The window past which a request's KV blocks can be given back: where every layer attends a sliding
    window (Mistral, Phi-3), the largest; None where any layer attends everything before it."""
    windows = [getattr(layer, "window", None) for layer in model.layers]
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)


def _num_blocks(config: EngineConfig, mc: ModelConfig, per_block: int, dtype: torch.dtype, max_model_len: int) -> int:
    """KV blocks that fit the budget once the recurrent state slots (which share it) are set aside."""
    slot_bytes = 0
    if mc.is_hybrid and mc.mamba is not None:  # one state slot per running sequence
        slot_bytes = config.max_num_seqs * state_bytes_per_slot(len(mc.recurrent_layers), mc.mamba, dtype)
    budget = config.kv_cache_bytes - slot_bytes
    if budget < 0 and config.num_kv_blocks is None:
        raise ValueError(
            f"kv_cache_memory {config.kv_cache_bytes} B cannot hold the recurrent state of max_num_seqs="
            f"{config.max_num_seqs} sequences ({slot_bytes} B); raise kv_cache_memory or lower max_num_seqs"
        )
    num_blocks = config.num_kv_blocks or (budget // per_block if per_block else _RECURRENT_ONLY_BLOCKS)
    if num_blocks < 1:
        after = f" after the recurrent state slots ({slot_bytes} B)" if slot_bytes else ""
        raise ValueError(f"kv_cache_memory {config.kv_cache_bytes} B holds no KV block of {per_block} B{after}")
    if per_block and num_blocks * config.block_size < max_model_len:
        log.warning(
            "the KV pool holds %d tokens (%d blocks), less than max_model_len %d: a request that could need "
            "more (prompt + max_tokens) is refused with a clear error; vLLM refuses such a configuration",
            num_blocks * config.block_size,
            num_blocks,
            max_model_len,
        )
    return num_blocks


def _recompute_cost(c: ModelConfig, block_size: int):
    """Cost of recomputing a block at a depth, for the cost-aware policy: linear layers + attention."""
    h, d, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
    per_layer = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * h * c.intermediate_size
    linear = 2 * (layers * per_layer + h * c.vocab_size)  # FLOPs per token
    attention = 4 * layers * c.num_attention_heads * d  # FLOPs per token per context token
    return recompute_cost(attention / linear, block_size)


def _recurrent_manager(config: EngineConfig, model: HybridModel) -> RecurrentCacheManager:
    """The state pool (max_num_seqs slots), checkpoint store and placement policy of a hybrid model.
    The store's default budget: a quarter of --kv-cache-memory (or of its default), also when --num-kv-blocks
    sizes the pool: snapshots are far larger than KV blocks, and a small test pool should not starve them."""
    cfg = model.config
    assert cfg.mamba is not None
    checkpoint_bytes = config.checkpoint_memory
    if checkpoint_bytes is None:
        checkpoint_bytes = config.kv_cache_bytes // 4
    pool = RecurrentStatePool(config.max_num_seqs, len(cfg.recurrent_layers), cfg.mamba, model.dtype, model.device)
    policy = config.placement_policy() if config.enable_prefix_caching else NoCheckpoints()
    store = None
    if not isinstance(policy, NoCheckpoints):
        store = CheckpointStore(checkpoint_bytes)
        if checkpoint_bytes < pool.bytes_per_slot:
            log.warning(
                "checkpoint memory %d B is less than one snapshot of the recurrent state (%d B): no checkpoint "
                "can be stored; raise --checkpoint-memory",
                checkpoint_bytes,
                pool.bytes_per_slot,
            )
    held = f" in {checkpoint_bytes / (1 << 20):.1f} MiB ({checkpoint_bytes // max(pool.bytes_per_slot, 1)} snapshots)"
    off = " (off" + ("" if config.enable_prefix_caching else ": prefix caching off") + ")"
    log.info(
        "recurrent state: %d layers, %d slots x %.1f MiB; checkpoints: %s%s",
        len(cfg.recurrent_layers),
        pool.num_slots,
        pool.bytes_per_slot / (1 << 20),
        policy.describe(),
        held if store is not None else off,
    )
    return RecurrentCacheManager(pool, config.block_size, store, policy)


def build_tiers(config: EngineConfig, loaded: LoadedModel, parts: EngineParts) -> TieredCache | None:
    """Host-RAM and persistent tiers under the pool (--cpu-offload-gb, --kv-store), or None; hooked into
    the pool (evictions) and the cache manager (lookups, write-through)."""
    if not config.enable_prefix_caching or (config.cpu_offload_gb <= 0 and not config.kv_store):
        return None
    store = open_store(config.kv_store, config.kv_store_max_bytes) if config.kv_store else None
    fingerprint = getattr(loaded, "_kv_fingerprint", None)  # hashing every weight: once per model
    if fingerprint is None:
        fingerprint = model_fingerprint(loaded.config, loaded.weights)
        loaded._kv_fingerprint = fingerprint
    dtype = str(parts.dtype).removeprefix("torch.")
    arithmetic = parts.backends.tag(parts.device, parts.dtype)
    namespace = f"{fingerprint}-b{config.block_size}-{dtype}-{arithmetic}"
    block_io = TorchBlockIO(parts.runner.kv_cache)  # the tiers never touch the KV tensor themselves
    tiers = TieredCache(block_io, namespace, int(config.cpu_offload_gb * (1 << 30)), store)
    parts.pool.on_evict = tiers.on_evict
    parts.kv.tiers = tiers
    log.info("KV tiers under the pool: %s (namespace %s)", ", ".join(tiers.tiers), namespace)
    return tiers
