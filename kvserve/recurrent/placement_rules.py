"""Checkpoint placement policies: the interface, and the fixed rules that learn nothing.

Depths are in blocks throughout (the checkpoint store is keyed by block hashes, so a checkpoint can only sit
on a block boundary). The learned policy, optimal:M, is in placement_online.py.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

__all__ = ["BalancedSpacing", "EveryBlock", "LogSpacing", "NoCheckpoints", "PlacementPolicy", "SqrtSpacing"]


class PlacementPolicy(ABC):
    """Which depths a prefilling request snapshots its recurrent state at, possibly learned online.

    `version` grows whenever a learned placement changes; `placed` is then its depths for the longest prompts
    (the set C that J(C) measures; None for rules without one).
    """

    version: int = 0

    @property
    def placed(self) -> list[int] | None:
        """The depths placed for the longest prompts (shorter ones may get others: see OptimalPlacement)."""
        return None

    @abstractmethod
    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        """Sorted depths in 1..num_blocks at which a request of num_blocks full prompt blocks snapshots."""

    def observe(self, depth: int) -> None:
        """A request diverged from the cached prefix at this depth (blocks)."""
        if depth < 0:
            raise ValueError(f"overlap depth must be >= 0, got {depth}")

    @abstractmethod
    def describe(self) -> str:
        """The spec and, for learned policies, the current depths, e.g. 'optimal:4 [3, 17, 40, 128]'."""

    @property
    def spec(self) -> str:
        """The --checkpoint-policy spec this policy was made from, e.g. 'every-block:8' or 'optimal:4'."""
        return self.describe()


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")


class NoCheckpoints(PlacementPolicy):
    @property
    def placed(self) -> list[int]:
        return []

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        return []

    def describe(self) -> str:
        return "none"


class EveryBlock(PlacementPolicy):
    """A checkpoint every `interval` blocks: interval, 2 * interval, ..."""

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"every-block interval must be >= 1 block, got {interval}")
        self.interval = interval

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        return list(range(self.interval, num_blocks + 1, self.interval))

    def describe(self) -> str:
        return f"every-block:{self.interval}"


class SqrtSpacing(PlacementPolicy):
    """A checkpoint every ceil(sqrt(n)) blocks of an n-block prompt: about sqrt(n) checkpoints."""

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        if num_blocks == 0:
            return []
        step = math.isqrt(num_blocks - 1) + 1  # ceil(sqrt(n))
        return list(range(step, num_blocks + 1, step))

    def describe(self) -> str:
        return "sqrt"


class LogSpacing(PlacementPolicy):
    """Geometric depths 1, 2, 4, 8, ... up to the prompt: dense near the root, sparse deep down."""

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        out, d = [], 1
        while d <= num_blocks:
            out.append(d)
            d *= 2
        return out

    def describe(self) -> str:
        return "log"


class BalancedSpacing(PlacementPolicy):
    """M checkpoints evenly spaced over each prompt: every n // (M + 1) blocks of an n-block prompt, M of them."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"balanced:M needs M >= 1 checkpoints, got {budget}")
        self.budget = budget

    def checkpoint_depths(self, num_blocks: int) -> list[int]:
        _check_num_blocks(num_blocks)
        step = max(1, num_blocks // (self.budget + 1))
        return list(range(step, min(step * self.budget, num_blocks) + 1, step))  # O(min(M, n)), any M

    def describe(self) -> str:
        return f"balanced:{self.budget}"
