"""Where to snapshot a recurrent state: checkpoint placement policies, and `make_placement_policy(spec)`.

A recurrent (Mamba-style) layer keeps one fixed-size state per sequence, so a new request can resume only
from a depth where that exact state was stored. Attention KV is cached at every block, recurrent state only
at a few checkpoints; a request whose cached prefix ends at depth t resumes from the deepest checkpoint at or
below t and recomputes the rest. Which depths to snapshot is a policy:

    placement_cost.py     J(C), the expected recomputation of a placement, and its exact optimum (a DP)
    placement_rules.py    the PlacementPolicy interface and the fixed rules
    placement_online.py   optimal:M, the optimum learned online from observed overlap depths
    placement.py          this entry point: the --checkpoint-policy specs; every name above is importable here

Placement policies (`make_placement_policy(spec)`, the `--checkpoint-policy` flag) decide the depths a
request snapshots at. Depths are in blocks throughout (the store is keyed by block hashes, so a checkpoint
can only sit on a block boundary):

    none            no checkpoints (every hit recomputes its whole prefix)
    every-block:B   every B blocks (B * block_size tokens): B, 2B, ...
    sqrt            every ceil(sqrt(n)) blocks for an n-block prompt, so about sqrt(n) checkpoints
    log             geometric: depths 1, 2, 4, 8, ... (doubling) up to n
    balanced:M      M checkpoints evenly spaced over each prompt: every n // (M + 1) blocks of an n-block
                    prompt (the paper's fixed-count baseline)
    optimal:M       the exact DP (placement_cost.py) on the learned distribution, per prompt length
                    (placement_online.py)

No torch here (numpy only): a policy knows depths, never tensors.
"""

from __future__ import annotations

from kvserve.recurrent.placement_cost import expected_recompute, optimal_checkpoints
from kvserve.recurrent.placement_online import DepthHistogram, OptimalPlacement
from kvserve.recurrent.placement_online import _Solution as _Solution  # tests check its per-length answers
from kvserve.recurrent.placement_rules import (
    BalancedSpacing,
    EveryBlock,
    LogSpacing,
    NoCheckpoints,
    PlacementPolicy,
    SqrtSpacing,
)

__all__ = [
    "BalancedSpacing",
    "DepthHistogram",
    "EveryBlock",
    "LogSpacing",
    "NoCheckpoints",
    "OptimalPlacement",
    "PlacementPolicy",
    "SqrtSpacing",
    "expected_recompute",
    "make_placement_policy",
    "optimal_checkpoints",
]


SPECS = ("none", "every-block:B", "sqrt", "log", "balanced:M", "optimal:M")


def _int_arg(spec: str, arg: str, what: str) -> int:
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"checkpoint policy {spec!r}: {what} must be an integer, got {arg!r}") from None
    if value < 1:
        raise ValueError(f"checkpoint policy {spec!r}: {what} must be >= 1, got {value}")
    return value


def make_placement_policy(
    spec: str,
    *,
    max_depth_blocks: int = 4096,
    resolve_every: int = 32,
    decay: float = 0.999,  # bench/sparse_prefix.py sweeps: 0.99 recomputes 6-14% less (summed over M) but misses
    # the 200-request J target at more budgets and changes placement 2-3x as often
    switch_margin: float = 0.02,  # adopt a new placement only if J improves by > 2%
) -> PlacementPolicy:
    """The policy a --checkpoint-policy spec names; one of none, every-block:B, sqrt, log, balanced:M, optimal:M."""
    name, sep, arg = spec.strip().lower().partition(":")
    if name in ("none", "sqrt", "log"):
        if sep:
            raise ValueError(f"checkpoint policy {spec!r}: {name} takes no argument")
        return {"none": NoCheckpoints, "sqrt": SqrtSpacing, "log": LogSpacing}[name]()
    if name == "every-block":
        if not sep:
            raise ValueError(f"checkpoint policy {spec!r}: write every-block:B with B the interval in blocks")
        return EveryBlock(_int_arg(spec, arg, "the interval B (blocks)"))
    if name in ("balanced", "optimal"):
        if not sep:
            raise ValueError(f"checkpoint policy {spec!r}: write {name}:M with M the number of checkpoints")
        if name == "balanced":
            return BalancedSpacing(_int_arg(spec, arg, "the budget M"))
        return OptimalPlacement(
            _int_arg(spec, arg, "the budget M"),
            max_depth_blocks=max_depth_blocks,
            resolve_every=resolve_every,
            decay=decay,
            switch_margin=switch_margin,
        )
    raise ValueError(f"unknown checkpoint policy {spec!r}; choose one of {', '.join(SPECS)}")
