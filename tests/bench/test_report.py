"""report.py on hand-made results: percentiles against numpy, TPOT, throughput, hit rate, failures counted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvserve.bench.client import BenchRun, RequestResult
from kvserve.bench.report import format_table, percentile, stats_ms, summarize


@pytest.mark.parametrize(
    "values",
    [
        [1.0],
        [3.0, 1.0],
        [0.5, 0.1, 0.9, 0.3, 0.7],
        list(np.random.default_rng(0).exponential(0.2, 101)),
        list(range(1000)),
    ],
)
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


def test_percentile_of_nothing_raises():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_in_milliseconds():
    xs = [0.010, 0.020, 0.030, 0.040, 1.000]
    s = stats_ms(xs)
    assert s["mean"] == pytest.approx(220.0)
    assert s["median"] == pytest.approx(30.0)
    assert s["p90"] == pytest.approx(1000 * np.percentile(xs, 90))
    assert s["p99"] == pytest.approx(1000 * np.percentile(xs, 99))
    assert stats_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def _ok(i, ttft, e2e, out, prompt=None, cached=None, itl=()):
    return RequestResult(
        index=i,
        ok=True,
        ttft=ttft,
        e2e=e2e,
        output_tokens=out,
        prompt_tokens=prompt,
        cached_tokens=cached,
        itl=list(itl),
    )


def test_summary_numbers():
    results = [
        _ok(0, 0.1, 1.1, 11, prompt=100, cached=0, itl=[0.1] * 10),
        _ok(1, 0.2, 2.2, 21, prompt=200, cached=150, itl=[0.1] * 20),
        _ok(2, 0.3, 0.3, 1, prompt=300, cached=300),  # one token: no TPOT
        RequestResult(index=3, ok=False, error="HTTP 500: boom"),
        RequestResult(index=4, ok=False, error="RemoteProtocolError: cut"),
    ]
    s = summarize(BenchRun(results=results, duration_s=2.0, client_cpu_s=0.5), workload="w")
    assert s["workload"] == "w"
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["errors"] == {"HTTP 500": 1, "RemoteProtocolError": 1}
    assert s["prompt_tokens"] == 600 and s["output_tokens"] == 33 and s["cached_tokens"] == 450
    assert s["prefix_cache_hit_rate"] == pytest.approx(450 / 600)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["input_tokens_per_s"] == pytest.approx(300) and s["output_tokens_per_s"] == pytest.approx(16.5)
    assert s["client_cpu_percent"] == pytest.approx(25.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(1000 * np.percentile([0.1, 0.2, 0.3], 99))
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # (1.1-0.1)/10 and (2.2-0.2)/20
    assert s["itl_ms"]["p90"] == pytest.approx(100.0)
    assert s["e2e_ms"]["mean"] == pytest.approx(1000 * (1.1 + 2.2 + 0.3) / 3)
    assert len(s["requests"]) == 5 and s["requests"][3]["error"] == "HTTP 500: boom"
    assert "hit rate 75.0%" in format_table(s)


def test_hit_rate_is_none_without_cached_tokens():
    results = [_ok(0, 0.1, 0.2, 2, prompt=100), _ok(1, 0.1, 0.2, 2)]
    s = summarize(BenchRun(results=results, duration_s=1.0, client_cpu_s=0.0))
    assert s["prefix_cache_hit_rate"] is None
    assert s["prompt_tokens"] == 100 and s["prompt_tokens_reported"] == 1
    assert "hit rate n/a" in format_table(s)


def test_all_failed_still_reports():
    s = summarize(BenchRun(results=[RequestResult(index=0, error="x")], duration_s=1.0, client_cpu_s=0.0))
    assert s["failed"] == 1 and s["completed"] == 0
    assert s["ttft_ms"]["p99"] is None and not math.isnan(s["request_throughput"])
    format_table(s)
