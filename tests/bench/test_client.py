"""The client against the fake server: timings, token counts, cached tokens, failures, schedules, the CLI."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvserve.bench.client import ClientConfig, arrival_times, discover_model, run_requests
from kvserve.bench.report import summarize
from kvserve.bench.workloads import BenchRequest, build_workload
from kvserve.cli import main as cli_main
from tests.bench.fake_server import MODEL


def _cfg(fake, **kw) -> ClientConfig:
    kw.setdefault("concurrency", 4)
    return ClientConfig(base_url=fake.base_url, model=MODEL, **kw)


def _run(requests, cfg):
    return asyncio.run(run_requests(requests, cfg))


def test_discovers_model(fake):
    assert asyncio.run(discover_model(fake.base_url)) == MODEL
    assert asyncio.run(discover_model(fake.base_url + "/v1/")) == MODEL
    for body in [{"data": [{"name": "x"}]}, [1, 2], {"data": []}, {"data": "x"}]:
        fake.state.reset(models_body=body)
        with pytest.raises(ValueError, match="give --model"):
            asyncio.run(discover_model(fake.base_url))
    fake.state.reset()


def test_timings_and_token_counts(fake):
    fake.state.reset(ttft_s=0.05, itl_s=0.01)
    reqs = [
        BenchRequest(prompt="a" * 400),
        BenchRequest(messages=({"role": "user", "content": "b" * 80},), max_tokens=5),
    ]
    run = _run(reqs, _cfg(fake, max_tokens=8))
    a, b = run.results
    assert a.ok and b.ok, (a.error, b.error)
    assert (a.output_tokens, a.prompt_tokens, a.cached_tokens) == (8, 100, 50)
    assert (b.output_tokens, b.prompt_tokens, b.cached_tokens) == (5, 20, 10)
    assert len(a.itl) == 7 and len(b.itl) == 4
    # lower bounds only: the server sleeps that long, so no load can make them fail; load can stretch any time
    assert a.ttft >= 0.05 and a.e2e >= 0.05 + 7 * 0.01
    assert a.ttft + sum(a.itl) <= a.e2e and a.tpot == pytest.approx((a.e2e - a.ttft) / 7)
    assert run.client_cpu_s > 0 and run.duration_s >= a.e2e


def test_usage_wins_over_chunk_count(fake):
    fake.state.reset(tokens_per_chunk=3)
    (r,) = _run([BenchRequest(prompt="x" * 40)], _cfg(fake, max_tokens=10)).results
    assert r.ok and r.output_tokens == 10 and len(r.itl) == 3  # 4 chunks of text


def test_chunks_counted_without_usage(fake):
    fake.state.reset(report_usage=False)
    (r,) = _run([BenchRequest(prompt="x" * 40)], _cfg(fake, max_tokens=6)).results
    assert r.ok and r.output_tokens == 6 and r.prompt_tokens is None and r.cached_tokens is None


def test_hit_rate_matches_what_the_server_reported(fake):
    fake.state.reset(cached_fraction=0.75)
    reqs = build_workload("shared-system-prompt", 12, seed=1)
    s = summarize(_run(reqs, _cfg(fake, max_tokens=4)))
    log = fake.state.log
    assert s["completed"] == 12 and len(log) == 12
    assert s["prompt_tokens"] == sum(x.prompt_tokens for x in log)
    assert s["cached_tokens"] == sum(x.cached_tokens for x in log)
    assert s["prefix_cache_hit_rate"] == pytest.approx(s["cached_tokens"] / s["prompt_tokens"])
    assert s["output_tokens"] == 48


@pytest.mark.parametrize("kind", ["500", "event", "break", "nodone"])
def test_failed_requests_are_counted_not_dropped(fake, kind):
    reqs = [BenchRequest(prompt=f"fine {i}") for i in range(4)]
    reqs[2] = BenchRequest(prompt=f"this one breaks [fail:{kind}]")
    run = _run(reqs, _cfg(fake, max_tokens=5))
    assert [r.index for r in run.results] == [0, 1, 2, 3]
    assert [r.ok for r in run.results] == [True, True, False, True]
    assert run.results[2].error
    s = summarize(run)
    assert (s["completed"], s["failed"], s["num_requests"]) == (3, 1, 4)
    assert s["output_tokens"] == 15  # the failed request's partial output is not counted


def test_concurrency_is_respected(fake):
    fake.state.reset(ttft_s=0.03)
    run = _run([BenchRequest(prompt=str(i)) for i in range(12)], _cfg(fake, concurrency=3, max_tokens=2))
    assert fake.state.max_in_flight == 3 == run.max_in_flight  # the client's count agrees with the server's


def test_timeout_bounds_the_whole_request(fake):
    """--timeout is per request, end to end: a stream that keeps sending, but too slowly, fails."""
    fake.state.reset(ttft_s=0.05, itl_s=0.05)
    run = _run([BenchRequest(prompt=str(i)) for i in range(3)], _cfg(fake, max_tokens=12, timeout_s=0.25))
    assert not any(r.ok for r in run.results)
    assert all(r.error.startswith("timeout") for r in run.results)
    run = _run([BenchRequest(prompt="x")], _cfg(fake, max_tokens=2, timeout_s=5))
    assert run.results[0].ok


def test_dependent_turn_waits_for_its_parent(fake):
    fake.state.reset(ttft_s=0.02)
    reqs = build_workload("multi-turn", 12, seed=0)
    run = _run(reqs, _cfg(fake, concurrency=8, max_tokens=3))
    assert all(r.ok for r in run.results)
    served = {x.text: x for x in fake.state.log}
    for req in reqs:
        if req.depends_on is not None:
            child = served["".join(m["content"] for m in req.messages)]
            parent = served["".join(m["content"] for m in reqs[req.depends_on].messages)]
            assert child.start >= parent.end


def test_poisson_arrivals_seeded():
    reqs = [BenchRequest(prompt="p")] * 2000
    cfg = ClientConfig(base_url="x", model="m", request_rate=20.0, seed=3)
    times = arrival_times(reqs, cfg)
    assert times == arrival_times(reqs, cfg) and times[0] == 0.0
    assert times != arrival_times(reqs, ClientConfig(base_url="x", model="m", request_rate=20.0, seed=4))
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 20, rel=0.1)


def test_rate_and_trace_modes_run(fake):
    run = _run([BenchRequest(prompt=str(i)) for i in range(6)], _cfg(fake, concurrency=None, request_rate=100.0))
    assert all(r.ok for r in run.results)
    trace = [BenchRequest(prompt="a", arrival_time=0.0), BenchRequest(prompt="b", arrival_time=0.2)]
    run = _run(trace, _cfg(fake, concurrency=None, max_tokens=2))
    assert run.results[1].start >= 0.2  # not before its arrival time (a lower bound: no load can break it)
    assert [x.text for x in fake.state.log[-2:]] == ["a", "b"]  # arrived in trace order


def test_cli_writes_result_file(fake, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--base-url", fake.base_url, "--workload", "no-sharing", "--num-requests", "5"]
    assert cli_main(argv + ["--max-tokens", "3", "--ignore-eos", "--result-file", str(out), "--no-progress"]) == 0
    s = json.loads(out.read_text())
    assert s["model"] == MODEL and s["completed"] == 5 and s["output_tokens"] == 15 and s["concurrency"] == 8
    assert s["ttft_ms"]["p99"] is not None and len(s["requests"]) == 5
    assert "TTFT" in capsys.readouterr().out


def test_cli_names_the_first_error_and_a_missing_trace(fake, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "[fail:500] a"}\n{"prompt": "[fail:500] b"}\n')
    base = ["bench", "--base-url", fake.base_url, "--no-progress"]
    assert cli_main(base + ["--trace", str(trace)]) == 1
    assert "all 2 requests failed; the first: HTTP 500" in capsys.readouterr().err
    assert cli_main(base + ["--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the trace" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(fake, capsys):
    base = ["bench", "--base-url", fake.base_url]
    assert cli_main(base + ["--workload", "no-sharing", "--concurrency", "0"]) == 2
    assert cli_main(base) == 2
    with pytest.raises(SystemExit):
        cli_main(base + ["--workload", "no-sharing", "--concurrency", "2", "--request-rate", "1"])


def test_ctrl_c_exits_130_without_a_traceback(fake):
    import signal
    import subprocess
    import sys
    import time

    fake.state.reset(ttft_s=30.0)  # every request hangs until interrupted
    argv = [sys.executable, "-m", "kvserve.cli", "bench", "--base-url", fake.base_url, "--workload", "no-sharing"]
    proc = subprocess.Popen(argv + ["--num-requests", "2", "--no-progress"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not fake.state.in_flight and time.monotonic() < deadline:  # wait until its requests are out
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    fake.state.reset()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
