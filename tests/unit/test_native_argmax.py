"""Greedy sampling's parallel argmax (kvserve/model/csrc/sample.c) against torch.argmax and brute force."""

from __future__ import annotations

import pytest
import torch

from kvserve.model import native
from kvserve.model.sampler import sample
from kvserve.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("native_kernels")


@pytest.mark.parametrize("shape", [(32, 49152), (1, 49152), (5, 17), (3, 1), (7, 33)])
def test_argmax_rows_equals_torch_and_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    got = native.argmax_rows(x)
    assert got == x.argmax(dim=-1).tolist()
    for r, row in enumerate(x.tolist()):  # brute force: the first index of the largest value
        assert got[r] == row.index(max(row))


def test_ties_take_the_first_index_and_special_values():
    x = torch.zeros(3, 70)
    x[0, [7, 33, 69]] = 1.0  # ties across vector lanes and the tail
    x[1] = float("-inf")  # a row of -inf: index 0, as torch
    x[2, 16] = float("inf")
    x[2, 48] = float("inf")
    assert native.argmax_rows(x) == [7, 0, 16] == x.argmax(dim=-1).tolist()
    # bf16-rounded logits (as the model returns them) tie often
    y = torch.randn(32, 4096, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    assert native.argmax_rows(y) == y.argmax(dim=-1).tolist()


def test_a_nan_row_falls_back_to_torch():
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(4))
    x[2, 50] = float("nan")
    assert native.argmax_rows(x) is None
    params = [SamplingParams(temperature=0)] * 4
    assert [r.token_id for r in sample(x, params, [None] * 4)] == x.argmax(dim=-1).tolist()
