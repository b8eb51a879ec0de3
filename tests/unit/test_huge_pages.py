"""Weights and the KV pool live in 2 MiB-aligned buffers the kernel backs with transparent huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.model.device import HUGE_PAGE, huge_page_buffer, pack_on_huge_pages


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_packed_tensors_equal_the_originals_and_are_aligned_contiguous_views():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 11, generator=gen), torch.randn(5, generator=gen).bfloat16(), torch.zeros(0)]
    tensors.append(torch.randint(0, 9, (3, 4, 5), generator=gen))
    packed = pack_on_huge_pages(tensors)
    for src, dst in zip(tensors, packed):
        assert dst.dtype == src.dtype and dst.shape == src.shape and dst.is_contiguous()
        assert torch.equal(dst, src)
        assert dst.data_ptr() % 64 == 0 or dst.numel() == 0
    assert packed[0].data_ptr() % HUGE_PAGE == 0
    assert packed[0].untyped_storage().data_ptr() == packed[1].untyped_storage().data_ptr()  # one buffer
    src0 = tensors[0].clone()
    tensors[0].add_(1)  # copies, not aliases
    assert torch.equal(packed[0], src0)


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(), reason="no THP on this OS")
def test_buffer_is_backed_by_huge_pages_where_thp_allows_it():
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in mode:
        pytest.skip("THP disabled on this machine")
    before = _anon_huge_kib()
    buf = huge_page_buffer(32 * HUGE_PAGE)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == 32 * HUGE_PAGE
    buf.fill_(1)  # first touch: the kernel faults in huge pages
    assert _anon_huge_kib() - before >= 16 * HUGE_PAGE // 1024  # at least half (fragmentation may refuse some)
