"""`kvserve bench`: build a workload (or read a trace), run it against a server, print and save the summary.

    kvserve bench --base-url http://127.0.0.1:8000 --workload shared-system-prompt --num-requests 64 \
        --concurrency 8 --max-tokens 32 --result-file bench/results/ssp.json

Without --concurrency or --request-rate, a trace with arrival times is replayed on its clock and anything
else runs at concurrency 8.

The server's /metrics is scraped before and after the measured run (best effort, see server_metrics.py):
kvserve's recurrent-state checkpoint counters, recomputed prompt tokens per request and checkpoint placement
go into the summary's "server" field (None when the server has no /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from kvserve.bench.workloads import WORKLOADS, BenchRequest, build_workload, load_trace

if TYPE_CHECKING:
    from kvserve.bench.client import ClientConfig

DEFAULT_CONCURRENCY = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in workload (or give --trace)")
    p.add_argument("--trace", help="JSONL file: {prompt | messages, tools?, max_tokens?, arrival_time?} per line")
    p.add_argument("--num-requests", type=int, default=None, help="requests to send (default 64, or the whole trace)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (closed loop)")
    load.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson arrivals (open loop)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (unless the trace says)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--seed", type=int, default=0, help="seeds the workload text and the arrival times")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to run every answer to max-tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="short unmeasured requests sent first")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into each request body")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--result-file", default=None, help="write the JSON summary (with per-request rows) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def requests_from_args(args: argparse.Namespace) -> tuple[str, list[BenchRequest]]:
    if (args.workload is None) == (args.trace is None):
        raise ValueError("give exactly one of --workload and --trace")
    if args.trace:
        return f"trace:{args.trace}", load_trace(args.trace, args.num_requests)
    return args.workload, build_workload(args.workload, args.num_requests or 64, args.seed)


def config_from_args(args: argparse.Namespace, model: str, requests: list[BenchRequest]) -> ClientConfig:
    from kvserve.bench.client import ClientConfig

    for name in ("concurrency", "max_tokens", "num_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    concurrency = args.concurrency
    if concurrency is None and args.request_rate is None and all(r.arrival_time is None for r in requests):
        concurrency = DEFAULT_CONCURRENCY
    if not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    return ClientConfig(
        base_url=args.base_url,
        model=model,
        max_tokens=args.max_tokens,
        concurrency=concurrency,
        request_rate=args.request_rate,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        api_key=args.api_key,
        extra_body=args.extra_body,
    )


async def bench(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark the arguments describe; the summary (also written to --result-file when given)."""
    from kvserve.bench.client import discover_model, run_requests, warm_up
    from kvserve.bench.report import summarize, write_json
    from kvserve.bench.server_metrics import scrape, summarize_server

    workload, requests = requests_from_args(args)
    model = args.model or await discover_model(args.base_url, args.api_key)
    cfg = config_from_args(args, model, requests)
    if args.warmup:
        await warm_up(cfg, args.warmup)
    before = await scrape(args.base_url, args.api_key)
    run = await run_requests(requests, cfg, progress=progress)
    after = await scrape(args.base_url, args.api_key) if before is not None else None
    summary = summarize(
        run,
        workload=workload,
        seed=args.seed,
        model=model,
        base_url=args.base_url,
        concurrency=cfg.concurrency,
        request_rate=cfg.request_rate,
        max_tokens=cfg.max_tokens,
        ignore_eos=cfg.ignore_eos,
        server=summarize_server(before, after),
    )
    if args.result_file:
        write_json(summary, args.result_file)
    return summary


def main(args: argparse.Namespace) -> int:
    import httpx

    from kvserve.bench.report import format_table

    try:
        summary = asyncio.run(bench(args, progress=not args.no_progress and sys.stderr.isatty()))
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    print(format_table(summary))
    if args.result_file:
        print(f"\nwrote {args.result_file}")
    if summary["failed"]:
        first = next(r["error"] for r in summary["requests"] if not r["ok"])
        what = "all" if not summary["completed"] else f"{summary['failed']} of"
        print(f"error: {what} {summary['num_requests']} requests failed; the first: {first}", file=sys.stderr)
    return 0 if summary["completed"] else 1
