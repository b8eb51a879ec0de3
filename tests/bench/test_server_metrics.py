"""`kvserve bench` reads the server's /metrics: differences over the run, quantiles from buckets, and no crash
(the fields are None) when the server has no /metrics or something else there.

Expected values come from what the fake server served (its log), not from the bench's own numbers; the fake
exposes kvserve's real metrics (kvserve.server.metrics) with earlier traffic already counted.
"""

from __future__ import annotations

import json

import pytest

from kvserve.bench.server_metrics import histogram_quantile, metrics_url
from kvserve.cli import main as cli_main
from kvserve.server.metrics import RECOMPUTED_BUCKETS
from tests.bench.fake_server import BLOCK_SIZE, PLACEMENT_DEPTHS, PLACEMENT_POLICY

INF = float("inf")


def test_histogram_quantile_by_hand():
    buckets = [(10.0, 2.0), (20.0, 6.0), (INF, 8.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(15.0)  # rank 4: halfway through (10, 20]
    assert histogram_quantile(0.25, buckets) == pytest.approx(10.0)  # rank 2: the top of the first bucket
    assert histogram_quantile(0.1, buckets) == pytest.approx(4.0)  # rank 0.8 of 2 in (0, 10]
    assert histogram_quantile(0.99, buckets) == 20.0  # rank 7.92 in +Inf: the highest finite bound
    assert histogram_quantile(0.5, list(reversed(buckets))) == pytest.approx(15.0)  # order does not matter
    assert histogram_quantile(0.5, [(0.0, 3.0), (16.0, 4.0), (INF, 4.0)]) == 0.0  # rank in the le=0 bucket
    assert histogram_quantile(0.5, [(10.0, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_metrics_url():
    assert metrics_url("http://h:1") == metrics_url("http://h:1/v1/") == "http://h:1/metrics"


def _bench(fake, tmp_path, n: int = 6) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    argv = ["bench", "--base-url", fake.base_url, "--workload", "no-sharing", "--num-requests", str(n)]
    assert cli_main(argv + ["--max-tokens", "2", "--result-file", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text()), out


def _buckets(values: list[int]) -> list[tuple[float, float]]:
    """Cumulative buckets built directly from the values (brute force)."""
    return [(float(b), float(sum(v <= b for v in values))) for b in RECOMPUTED_BUCKETS] + [(INF, len(values))]


def test_checkpoint_and_recomputed_deltas(fake, tmp_path, capsys):
    fake.state.reset(serve_metrics=True, cached_fraction=0.25)
    s, _ = _bench(fake, tmp_path)
    served = fake.state.log
    recomputed = [r.prompt_tokens - r.cached_tokens for r in served]
    assert len(served) == 6 and all(r.cached_tokens for r in served)
    rec = s["server"]["recomputed_prompt_tokens"]
    assert rec["count"] == 6 and rec["sum"] == sum(recomputed)  # earlier traffic subtracted
    assert rec["mean"] == pytest.approx(sum(recomputed) / 6)
    assert rec["p50"] == pytest.approx(histogram_quantile(0.5, _buckets(recomputed)))
    assert rec["p99"] == pytest.approx(histogram_quantile(0.99, _buckets(recomputed)))
    assert s["server"]["checkpoints"] == {
        "stored": 6,
        "hits": 6,
        "misses": 0,
        "evicted": 0,
        "resumed_tokens": sum(r.cached_tokens for r in served),
        "bytes_held": (7 << 20) + 6 * 1024,  # a gauge: its value after the run, not a difference
    }
    assert s["server"]["placement"] == {
        "policy": PLACEMENT_POLICY,
        "depths": list(PLACEMENT_DEPTHS),
        "block_size": BLOCK_SIZE,
        "changes": 6,
    }
    text = capsys.readouterr().out
    assert f"mean {sum(recomputed) / 6:,.1f}" in text and "(6 req)" in text
    assert "stored 6   hits 6   misses 0   evicted 0" in text
    assert f"placement   {PLACEMENT_POLICY} at blocks {list(PLACEMENT_DEPTHS)}   (6 changes" in text


def test_attention_only_server_has_no_checkpoint_fields(fake, tmp_path, capsys):
    fake.state.reset(serve_metrics=True, checkpoint_metrics=False, cached_fraction=0.0)
    s, _ = _bench(fake, tmp_path, n=3)
    assert s["server"]["checkpoints"] is None and s["server"]["placement"] is None
    rec = s["server"]["recomputed_prompt_tokens"]
    assert rec["count"] == 3 and rec["sum"] == sum(r.prompt_tokens for r in fake.state.log)
    text = capsys.readouterr().out
    assert "recomputed  prompt tokens/request" in text and "checkpoints" not in text and "placement" not in text


@pytest.mark.parametrize("settings", [{}, {"metrics_text": "<html>not metrics</html>"}, {"metrics_text": ""}])
def test_server_without_metrics_still_benches(fake, tmp_path, capsys, settings):
    fake.state.reset(**settings)
    s, _ = _bench(fake, tmp_path, n=2)
    assert s["completed"] == 2
    if settings.get("metrics_text") == "":
        # An empty exposition is valid Prometheus text: the server is there but reports none of these.
        assert s["server"] == dict.fromkeys(("checkpoints", "recomputed_prompt_tokens", "placement", "spec_decode"))
    else:
        assert s["server"] is None
    text = capsys.readouterr().out
    assert "TTFT" in text and "recomputed" not in text and "checkpoints" not in text
