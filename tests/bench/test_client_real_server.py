"""The bench client against kvserve's real OpenAI server (in-process, 127.0.0.1, the bundled model).

The fake server (fake_server.py) fixes what the client must report; here the numbers come from a real engine,
and each is checked against a source the client does not read: token counts against our tokenizer, totals
against the server's own /metrics counters, cached tokens against the blocks the requests share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kvserve.bench.client import ClientConfig, run_requests
from kvserve.bench.report import summarize
from kvserve.bench.server_metrics import scrape, summarize_server
from kvserve.bench.workloads import BenchRequest
from kvserve.config import EngineConfig
from kvserve.server.app import build_app
from tests.server.conftest import ENGINE_DEFAULTS, MODEL, RunningServer

MAX_TOKENS = 4
BLOCK = 16  # EngineConfig's default block size
PREFIX = (
    "A lighthouse keeper writes in her log every evening: the wind, the colour of the sea, the ships that "
    "passed and the ones that did not. After forty years the log fills a whole shelf, and the harbour master "
    "asks to read it. She hands him the first volume and says that the answers are all in there somewhere."
)
TOPICS = ["Apples", "Bridges", "Clocks", "Dragons"]  # distinct first words: prompts diverge right after PREFIX


@pytest.fixture(scope="module")
def real_server(ours) -> Iterator[RunningServer]:
    srv = RunningServer(build_app(EngineConfig(**ENGINE_DEFAULTS), loaded=ours))
    yield srv
    srv.stop()


def _requests() -> list[BenchRequest]:
    """Request 0 computes PREFIX; 1-3 wait for it (depends_on) and reuse its blocks; 4-5 share nothing."""
    shared = [BenchRequest(prompt=f"{PREFIX} {t}?", depends_on=None if i == 0 else 0) for i, t in enumerate(TOPICS)]
    return shared + [BenchRequest(prompt="Name a colour."), BenchRequest(prompt="Count to three.")]


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_report_matches_the_real_server(real_server, ours):
    requests = _requests()
    ids = [ours.tokenizer.encode(r.prompt) for r in requests]
    shared = _common(ids[0], ids[1])
    assert shared // BLOCK >= 3 and all(_common(ids[i], ids[j]) == shared for i in range(4) for j in range(i))
    expected_cached = [0] + [shared // BLOCK * BLOCK] * 3 + [0, 0]

    cfg = ClientConfig(
        base_url=real_server.base_url, model=MODEL, max_tokens=MAX_TOKENS, concurrency=3, ignore_eos=True, timeout_s=60
    )
    before = asyncio.run(scrape(real_server.base_url))
    run = asyncio.run(run_requests(requests, cfg))
    real_server.wait_idle(timeout=30)
    after = asyncio.run(scrape(real_server.base_url))
    s = summarize(run, workload="handmade")

    assert all(r.ok for r in run.results), [r.error for r in run.results]
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 6, 0)
    assert [r.prompt_tokens for r in run.results] == [len(i) for i in ids]
    assert [r.output_tokens for r in run.results] == [MAX_TOKENS] * 6  # ignore_eos: every answer runs to the end
    assert [r.cached_tokens for r in run.results] == expected_cached
    assert (s["prompt_tokens"], s["output_tokens"], s["cached_tokens"]) == (
        sum(map(len, ids)),
        6 * MAX_TOKENS,
        sum(expected_cached),
    )
    assert s["prefix_cache_hit_rate"] == pytest.approx(sum(expected_cached) / sum(map(len, ids)))
    assert s["max_in_flight"] == 3

    def delta(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert delta("kvserve:prompt_tokens_total") == s["prompt_tokens"]
    assert delta("kvserve:generation_tokens_total") == s["output_tokens"]
    assert delta("kvserve:prefix_cache_hits_total") == s["cached_tokens"]
    recomputed = summarize_server(before, after)["recomputed_prompt_tokens"]
    assert (recomputed["count"], recomputed["sum"]) == (6, s["prompt_tokens"] - s["cached_tokens"])
