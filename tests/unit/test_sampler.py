"""The sampler against brute force: top-p's kept set against a plain sort, and keyed Gumbel-max sampling against
the distribution it claims to draw from."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve.model.sampler import _filtered_probs, sample
from kvserve.sampling_params import SamplingParams


def brute_force_top_p(logits: list[float], top_p: float) -> set[int]:
    """Tokens whose preceding mass (most likely first) is below top_p; the first always."""
    z = max(logits)
    probs = [math.exp(x - z) for x in logits]
    total = sum(probs)
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept, before = set(), 0.0
    for rank, i in enumerate(order):
        if rank > 0 and before >= top_p:
            break
        kept.add(i)
        before += probs[i] / total
    return kept


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat (the cut beyond the first 256) to peaked
@pytest.mark.parametrize("top_p", [1e-12, 0.3, 0.9, 0.999])
def test_top_p_keeps_what_a_full_sort_keeps(scale, top_p):
    gen = torch.Generator().manual_seed(int(scale * 10 + top_p * 1000))
    logits = torch.randn(5000, generator=gen, dtype=torch.float64) * scale
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    kept = set(torch.nonzero(probs > 0).flatten().tolist())
    assert kept == brute_force_top_p(logits.tolist(), top_p)
    assert probs.sum().item() == pytest.approx(1.0)


def test_keyed_sampling_draws_from_the_filtered_distribution():
    """4,000 positions of one seed: token frequencies within 4 standard errors of the probabilities."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    params = [SamplingParams(temperature=1.0, seed=3)]
    n = 4000
    counts = [0] * 5
    for pos in range(n):
        counts[sample(logits, params, [(3, pos)])[0].token_id] += 1
    for c, p in zip(counts, [0.5, 0.25, 0.15, 0.07, 0.03], strict=True):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts


def test_keyed_sampling_is_a_function_of_seed_and_position_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=gen)
    params = [SamplingParams(temperature=1.0, seed=5)] * 3
    one = sample(logits[1:2], params[:1], [(5, 42)])[0].token_id
    batch = sample(logits, params, [(5, 41), (5, 42), (9, 42)])
    assert batch[1].token_id == one  # the rows around it change nothing
    draws = {sample(logits[1:2], params[:1], [(5, p)])[0].token_id for p in range(40)}
    assert len(draws) > 5  # positions draw independently
