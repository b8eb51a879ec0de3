"""The KV pool lives in a 2 MiB-aligned buffer the kernel backs with transparent huge pages."""

from __future__ import annotations

from pathlib import Path

from kvserve.model.device import HUGE_PAGE, huge_page_buffer
from tests.conftest import require_machine

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_buffer_is_backed_by_huge_pages_where_thp_allows_it():
    require_machine(THP.exists(), "transparent huge pages (an OS feature)")
    require_machine("[never]" not in THP.read_text(), "transparent huge pages: the OS has them set to never")
    before = _anon_huge_kib()
    buf = huge_page_buffer(32 * HUGE_PAGE)
    assert buf.data_ptr() % HUGE_PAGE == 0 and buf.numel() == 32 * HUGE_PAGE
    assert not buf.any()  # a fresh anonymous mapping reads as zeros
    buf.fill_(1)  # first touch: the kernel faults in huge pages
    assert int(buf.sum()) == buf.numel()
    assert _anon_huge_kib() - before >= 16 * HUGE_PAGE // 1024  # at least half (fragmentation may refuse some)
