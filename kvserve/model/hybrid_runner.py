"""HybridModelRunner: the ModelRunner plus each sequence's recurrent state (slots, checkpoints).

Per step: every scheduled request's slot is brought to the step's start (zeroed, or loaded from a checkpoint
on a resume), the model computes the new states without writing them, and only when the whole step (forward
and sampling) has succeeded are they committed to the pool and, at checkpoint positions, snapshotted. A
failed step is then retried request by request from unchanged states (see LLMEngine._execute).
"""

from __future__ import annotations

import logging

import torch

from kvserve.batch import ScheduledRequest, SchedulerOutput
from kvserve.config import EngineConfig
from kvserve.model.attention import AttentionMetadata
from kvserve.model.hybrid import HybridModel, RecurrentBatch
from kvserve.model.runner import ModelRunner
from kvserve.model.sampler import SampleResult
from kvserve.recurrent.checkpoints import CheckpointStore
from kvserve.recurrent.manager import RecurrentCacheManager
from kvserve.recurrent.placement import NoCheckpoints
from kvserve.recurrent.state_pool import RecurrentStatePool

log = logging.getLogger(__name__)


class HybridModelRunner(ModelRunner):
    def __init__(
        self, model: HybridModel, num_blocks: int, block_size: int, recurrent: RecurrentCacheManager, seed: int = 0
    ):
        super().__init__(model, num_blocks, block_size, seed=seed)  # type: ignore[arg-type]
        self.recurrent = recurrent
        self._pending: tuple[list[ScheduledRequest], torch.Tensor, torch.Tensor] | None = None

    def execute(self, sched: SchedulerOutput) -> dict[str, SampleResult]:
        self._pending = None
        results = super().execute(sched)
        if self._pending is not None:
            ordered, conv, ssm = self._pending
            self._pending = None
            self.recurrent.commit([s.request for s in ordered], [s.end for s in ordered], conv, ssm)
        return results

    def _forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
        decodes: list[ScheduledRequest],
        prefills: list[ScheduledRequest],
    ) -> torch.Tensor:
        ordered = decodes + prefills
        slots = [self.recurrent.prepare(s.request, s.start) for s in ordered]
        chunks, row = [], len(decodes)
        for s in prefills:
            chunks.append((row, s.num_new_tokens))
            row += s.num_new_tokens
        pool = self.recurrent.pool
        rec = RecurrentBatch(
            num_decodes=len(decodes),
            prefills=chunks,
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            conv=pool.conv,
            ssm=pool.ssm,
        )
        logits, conv, ssm = self.model.forward(input_ids, self.kv_cache, meta, logits_rows, rec)
        self._pending = (ordered, conv, ssm)
        return logits


def make_hybrid_runner(
    config: EngineConfig, model: HybridModel, num_blocks: int, checkpoint_bytes: int
) -> HybridModelRunner:
    """The runner with its state pool (max_num_seqs slots), checkpoint store and placement policy."""
    cfg = model.config
    assert cfg.mamba is not None
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
    recurrent = RecurrentCacheManager(pool, config.block_size, store, policy)
    held = f" in {checkpoint_bytes / (1 << 20):.1f} MiB ({checkpoint_bytes // max(pool.bytes_per_slot, 1)} snapshots)"
    log.info(
        "recurrent state: %d layers, %d slots x %.1f MiB; checkpoints: %s%s",
        len(cfg.recurrent_layers),
        pool.num_slots,
        pool.bytes_per_slot / (1 << 20),
        policy.describe(),
        held if store is not None else " (off" + ("" if config.enable_prefix_caching else ": prefix caching off") + ")",
    )
    return HybridModelRunner(model, num_blocks, config.block_size, recurrent, seed=config.seed)
