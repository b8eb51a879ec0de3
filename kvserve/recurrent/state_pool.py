"""RecurrentStatePool: fixed-size state slots, one per running sequence, for every recurrent layer at once.

Attention layers need KV for every token (paged blocks); a recurrent layer needs one fixed-size state per
sequence whatever its length. The pool preallocates
    conv: (recurrent layers, slots, conv_dim, K - 1)   model dtype
    ssm:  (recurrent layers, slots, H, P, N)            float32
and hands a slot to each running request. A slot also records how many tokens its state has consumed
(`position`), so the runner can tell whether the state is where a step starts: a fresh or preempted request
starts over from zeros; a resumed one is loaded from a checkpoint first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.model.config import MambaConfig


def state_bytes_per_slot(num_layers: int, mamba: MambaConfig, dtype: torch.dtype) -> int:
    conv = mamba.conv_dim * (mamba.conv_kernel - 1) * torch.empty((), dtype=dtype).element_size()
    ssm = mamba.num_heads * mamba.head_dim * mamba.state_size * 4
    return num_layers * (conv + ssm)


class RecurrentStatePool:
    def __init__(self, num_slots: int, num_layers: int, mamba: MambaConfig, dtype: torch.dtype, device: torch.device):
        if num_slots < 1:
            raise ValueError(f"the recurrent state pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.conv = torch.zeros(
            num_layers, num_slots, mamba.conv_dim, mamba.conv_kernel - 1, dtype=dtype, device=device
        )
        self.ssm = torch.zeros(
            num_layers,
            num_slots,
            mamba.num_heads,
            mamba.head_dim,
            mamba.state_size,
            dtype=torch.float32,
            device=device,
        )
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._slots: dict[str, int] = {}  # request id -> slot
        self._positions: dict[str, int] = {}  # request id -> tokens its state has consumed

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        return (self.conv[:, 0].numel() * self.conv.element_size()) + self.ssm[:, 0].numel() * 4

    def slot(self, request_id: str) -> int | None:
        return self._slots.get(request_id)

    def position(self, request_id: str) -> int | None:
        return self._positions.get(request_id)

    def acquire(self, request_id: str) -> int:
        """The request's slot, taking a free one if it has none (its contents are then undefined)."""
        slot = self._slots.get(request_id)
        if slot is not None:
            return slot
        if not self._free:
            raise RuntimeError(f"no free recurrent state slot for {request_id} ({self.num_slots} slots, all held)")
        slot = self._free.pop()
        self._slots[request_id] = slot
        self._positions[request_id] = -1
        return slot

    def reset(self, request_id: str) -> int:
        """Zero the request's state (position 0); acquires a slot if needed."""
        slot = self.acquire(request_id)
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()
        self._positions[request_id] = 0
        return slot

    def load(self, request_id: str, position: int, state: Sequence[torch.Tensor]) -> int:
        """Copy a snapshot ([conv, ssm] as from `snapshot`) into the request's slot, at `position` tokens."""
        slot = self.acquire(request_id)
        conv, ssm = state
        self.conv[:, slot].copy_(conv)
        self.ssm[:, slot].copy_(ssm)
        self._positions[request_id] = position
        return slot

    def snapshot(self, request_id: str) -> list[torch.Tensor]:
        """Views [conv (L, C, K - 1), ssm (L, H, P, N)] of the request's state (clone before keeping)."""
        slot = self._slots[request_id]
        return [self.conv[:, slot], self.ssm[:, slot]]

    def commit(
        self, request_ids: Sequence[str], positions: Sequence[int], conv: torch.Tensor, ssm: torch.Tensor
    ) -> None:
        """Write the states after a step: conv (L, S, C, K - 1), ssm (L, S, H, P, N) in request_ids order."""
        slots = torch.tensor([self._slots[r] for r in request_ids], dtype=torch.long, device=self.conv.device)
        self.conv.index_copy_(1, slots, conv.to(self.conv.dtype))
        self.ssm.index_copy_(1, slots, ssm)
        for r, p in zip(request_ids, positions):
            self._positions[r] = p

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        self._positions.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def check_invariants(self) -> None:
        held = list(self._slots.values())
        assert len(set(held)) == len(held), "a slot is held twice"
        assert not set(held) & set(self._free), "a held slot is also free"
        assert len(held) + len(self._free) == self.num_slots, "a slot leaked"
