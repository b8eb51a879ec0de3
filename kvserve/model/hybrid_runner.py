"""HybridModelRunner: the ModelRunner plus the recurrent state tensors of a hybrid model.

The caller (the engine, through its recurrent cache manager) brings each sequence's state slot to the step's
start (zeroed, or loaded from a checkpoint) and passes the slots in ModelBatch.state_slots. The model computes
the new states without writing them; they come back in ModelOutput (conv, ssm, rows in state_order), and the
caller commits them only once the whole step, forward and sampling, has succeeded, so a failed step can be
retried request by request from unchanged states.
"""

from __future__ import annotations

import torch

from kvserve.model.attention import AttentionMetadata
from kvserve.model.batch import ModelBatch, ModelOutput, SeqChunk
from kvserve.model.hybrid import HybridModel, RecurrentBatch
from kvserve.model.runner import ModelRunner


class HybridModelRunner(ModelRunner):
    def __init__(
        self,
        model: HybridModel,
        num_blocks: int,
        block_size: int,
        states: tuple[torch.Tensor, torch.Tensor],
    ):
        """states: the state pool's (conv, ssm) tensors, indexed by slot."""
        super().__init__(model, num_blocks, block_size)  # type: ignore[arg-type]
        self.conv, self.ssm = states

    def _forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,
        batch: ModelBatch,
        ordered: list[SeqChunk],
        num_decodes: int,
        out: ModelOutput,
    ) -> torch.Tensor:
        assert batch.state_slots is not None, "a hybrid model's batch needs each sequence's state slot"
        slot_of = {s.seq_id: slot for s, slot in zip(batch.seqs, batch.state_slots)}
        chunks, row = [], num_decodes
        for s in ordered[num_decodes:]:
            chunks.append((row, s.num_new_tokens))
            row += s.num_new_tokens
        rec = RecurrentBatch(
            num_decodes=num_decodes,
            prefills=chunks,
            slots=torch.tensor([slot_of[s.seq_id] for s in ordered], dtype=torch.long, device=self.device),
            conv=self.conv,
            ssm=self.ssm,
        )
        logits, out.conv, out.ssm = self.model.forward(input_ids, self.kv_cache, meta, logits_rows, rec)
        out.state_order = [s.seq_id for s in ordered]
        return logits
