"""bench/compare.py's tables: ratios are kvserve over each peer, missing numbers show as n/a."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_script(name: str):
    """A bench/ script as a module (its sibling imports resolved from bench/)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def compare():
    return _load_script("compare")


def _summary(p99: float, tput: float, hit: float | None) -> dict:
    stats = {"mean": p99 / 2, "median": p99 / 2, "p90": p99, "p99": p99}
    return {
        "ttft_ms": stats, "tpot_ms": stats, "e2e_ms": stats, "output_tokens_per_s": tput,
        "request_throughput": tput / 32, "prefix_cache_hit_rate": hit, "failed": 0, "client_cpu_percent": 1.0,
        "loadavg_1min": [2.0, 2.5],
    }  # fmt: skip


def test_ratio_table(compare):
    text = compare.markdown(
        "w", {"kvserve": _summary(100, 300, 0.9), "llama-server": _summary(400, 100, None)}, "machine", "cmd"
    )
    ours, theirs = [line for line in text.splitlines() if line.startswith("| kvserve |") or "llama-server" in line][:2]
    assert "| 0.90 |" in ours and "2.0/2.5" in ours
    assert "n/a" in theirs
    ratio_row = text.splitlines()[-1]
    assert ratio_row.startswith("| llama-server | 0.25x | 0.25x | 0.25x | 0.25x | 3.00x | 3.00x |")


def test_peers_know_every_compared_system(compare):
    assert set(compare.SYSTEMS) == set(compare.peers.PEERS_BY_NAME)
    launch = compare.peers.Launch(port=9999, concurrency=4, threads=2)
    argv = compare.peers.PEERS_BY_NAME["llama-server"].argv(Path("m.gguf"), launch)
    assert argv[argv.index("-np") + 1] == "4" and argv[argv.index("-c") + 1] == str(4 * compare.peers.MODEL_CONTEXT)
    argv = compare.peers.PEERS_BY_NAME["kvserve-nocache"].argv(Path("m.gguf"), launch)
    assert "--no-enable-prefix-caching" in argv and "9999" in argv


def test_cache_overhead_alternates_on_and_off_so_drift_hits_both():
    runs = _load_script("cache_overhead").order(4)
    assert [s for _, s in runs] == ["kvserve", "kvserve-nocache", "kvserve-nocache", "kvserve"] * 2
    assert sorted({r for r, _ in runs}) == [0, 1, 2, 3]
    for r in range(4):  # each round measures both systems once
        assert sorted(s for rr, s in runs if rr == r) == ["kvserve", "kvserve-nocache"]
