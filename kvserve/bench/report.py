"""A run's summary: percentiles of TTFT, TPOT, ITL and E2E; throughput; prefix-cache hit rate; the client's CPU.

Percentiles interpolate linearly between order statistics (numpy.percentile's default), computed over the
requests that succeeded. Throughput divides by the run's wall time (first send to last answer). The hit rate
is cached over prompt tokens, summed over the successful requests whose server reported both; it is None when
the server reports no cached tokens at all (llama-cpp-python, most proxies). What the server's own /metrics
said (`server`, from server_metrics.py) is printed when present.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvserve.bench.client import BenchRun

METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "median", "p90", "p99")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy.percentile(values, q)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values: list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 of seconds, in milliseconds; None each when there are no values."""
    if not values:
        return dict.fromkeys(STATS)
    return {
        "mean": 1000 * sum(values) / len(values),
        "median": 1000 * percentile(values, 50),
        "p90": 1000 * percentile(values, 90),
        "p99": 1000 * percentile(values, 99),
    }


def summarize(run: BenchRun, **meta: Any) -> dict[str, Any]:
    """The JSON-ready summary of a run; `meta` (workload, model, base_url, ...) is copied in first."""
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    dur = run.duration_s or float("nan")
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    output = sum(r.output_tokens for r in ok)
    both = [r for r in ok if r.prompt_tokens is not None and r.cached_tokens is not None]
    both_prompt = sum(r.prompt_tokens or 0 for r in both)
    summary: dict[str, Any] = dict(meta)
    summary.update(
        num_requests=len(run.results),
        completed=len(ok),
        failed=len(failed),
        errors=dict(Counter(_error_kind(r.error) for r in failed)),
        duration_s=run.duration_s,
        request_throughput=len(ok) / dur,
        input_tokens_per_s=prompt / dur,
        output_tokens_per_s=output / dur,
        total_tokens_per_s=(prompt + output) / dur,
        prompt_tokens=prompt,
        output_tokens=output,
        prompt_tokens_reported=sum(r.prompt_tokens is not None for r in ok),
        cached_tokens=sum(r.cached_tokens or 0 for r in both),
        prefix_cache_hit_rate=(sum(r.cached_tokens or 0 for r in both) / both_prompt) if both_prompt else None,
        client_cpu_s=run.client_cpu_s,
        client_cpu_percent=100 * run.client_cpu_s / dur,
        max_in_flight=run.max_in_flight,
    )
    values = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2e": [r.e2e for r in ok if r.e2e is not None],
    }
    for name in METRICS:
        summary[f"{name}_ms"] = stats_ms(values[name])
    summary["requests"] = [{**asdict(r), "tpot": r.tpot} for r in run.results]
    return summary


def _error_kind(error: str | None) -> str:
    return (error or "unknown").split(":")[0][:80]


def write_json(summary: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def format_table(s: dict[str, Any]) -> str:
    """A plain-text report of one summary (fits 80 columns)."""
    hit = s["prefix_cache_hit_rate"]
    lines = [
        f"workload {s.get('workload', '?')}  model {s.get('model', '?')}  {s.get('base_url', '')}",
        f"requests {s['completed']} ok / {s['failed']} failed in {s['duration_s']:.1f} s"
        + (f"   errors: {s['errors']}" if s["errors"] else ""),
        f"throughput  {_fmt(s['request_throughput'], 2)} req/s   input {_fmt(s['input_tokens_per_s'])} tok/s   "
        f"output {_fmt(s['output_tokens_per_s'])} tok/s",
        f"tokens      prompt {s['prompt_tokens']:,}   output {s['output_tokens']:,}   cached {s['cached_tokens']:,}"
        f"   prefix-cache hit rate {'n/a' if hit is None else f'{100 * hit:.1f}%'}",
        f"client CPU  {s['client_cpu_s']:.2f} s ({_fmt(s['client_cpu_percent'])}% of one core)"
        + (f"   at most {s['max_in_flight']} requests in flight" if s.get("max_in_flight") else ""),
        "",
        f"{'ms':<6}" + "".join(f"{h:>12}" for h in STATS),
    ]
    for name in METRICS:
        row = s[f"{name}_ms"]
        lines.append(f"{name.upper():<6}" + "".join(f"{_fmt(row[k]):>12}" for k in STATS))
    lines += _server_lines(s.get("server"))
    return "\n".join(lines)


def _server_lines(server: dict[str, Any] | None) -> list[str]:
    """The server's checkpoint counters, recomputed prompt tokens and placement, when it reported them."""
    if not server:
        return []
    lines = []
    rec = server.get("recomputed_prompt_tokens")
    if rec:
        lines.append(
            f"recomputed  prompt tokens/request: mean {_fmt(rec['mean'])}   p50 ~{_fmt(rec['p50'], 0)}   "
            f"p99 ~{_fmt(rec['p99'], 0)} ({rec['count']} req)"
        )
    ckpt = server.get("checkpoints")
    if ckpt:
        held = ckpt.get("bytes_held")
        lines.append(
            f"checkpoints stored {ckpt['stored']:,}   hits {ckpt['hits']:,}   misses {ckpt['misses']:,}   "
            f"evicted {ckpt['evicted']:,}"
        )
        lines.append(
            f"            resumed {ckpt['resumed_tokens']:,} tokens   held "
            + ("n/a" if held is None else f"{held / (1 << 20):,.1f} MiB")
        )
    spec = server.get("spec_decode")
    if spec:
        rate = spec["acceptance_rate"]
        lines.append(
            f"speculative drafts {spec['draft_tokens']:,}   accepted {spec['accepted_tokens']:,}   acceptance rate "
            + ("n/a" if rate is None else f"{100 * rate:.1f}%")
        )
    place = server.get("placement")
    if place:
        depths = "" if place["depths"] is None else f" at blocks {place['depths']}"
        lines.append(f"placement   {place['policy']}{depths}   ({place['changes']} changes during the run)")
    return [""] + lines if lines else []
