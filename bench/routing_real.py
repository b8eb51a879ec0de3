"""The real part of bench/routing.py: a fleet of engine replicas on this machine, one run per policy.

For each policy, `kvserve serve --replicas N --routing P` (as the launcher runs it, Ray on loopback) serves each
workload through `kvserve bench` (closed loop); /metrics gives the requests each replica served. Beside them,
on the same workloads: one engine alone (the hit rate a fleet should keep), and, with --vllm-router, vLLM's
router (`vllm-router --policy cache_aware`) in front of N single kvserve servers. A workload's prefix cache is
cold at its start: every system is restarted per workload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, replicas: int | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and (replicas is None or r.json().get("replicas") == replicas):
                return
        time.sleep(1)
    raise RuntimeError(f"{url} was not ready in {timeout} s")


@contextlib.contextmanager
def serving(args: list[str], url: str, replicas: int | None, log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "kvserve"), "serve", *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, replicas)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def per_replica_requests(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"kvserve:request_success_total\{(.*)\} (\S+)", line)
        if m and 'replica="' in m.group(1):
            replica = re.search(r'replica="([^"]+)"', m.group(1)).group(1)
            out[replica] = out.get(replica, 0) + float(m.group(2))
    return out


def bench(url: str, workload: str, n: int, concurrency: int, max_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [str(VENV_BIN / "kvserve"), "bench", "--base-url", url, "--workload", workload, "--num-requests", str(n)]
    cmd += ["--concurrency", str(concurrency), "--max-tokens", str(max_tokens), "--ignore-eos", "--no-progress"]
    subprocess.run([*cmd, "--result-file", str(result)], check=True, capture_output=True, timeout=3600)
    summary = json.loads(result.read_text())
    result.unlink()
    return {
        "hit_rate": summary["prefix_cache_hit_rate"],
        "ttft_p50_ms": summary["ttft_ms"]["median"],
        "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "tpot_p99_ms": summary["tpot_ms"]["p99"],
        "output_tok_s": summary["output_tokens_per_s"],
        "failed": summary["failed"],
    }


def engine_args(model: str, dtype: str, threads: int) -> list[str]:
    return [model, "--dtype", dtype, "--threads", str(threads), "--log-level", "warning"]


def run_fleet(policy: str, workload: str, opts: dict, logs: Path, disaggregate: str | None = None) -> dict:
    """One fleet run; with disaggregate "P:D", P prefill and D decode replicas instead of opts' replicas."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = engine_args(opts["model"], opts["dtype"], opts["threads"])
    args += ["--port", str(port), "--routing", policy]
    args += ["--disaggregate", disaggregate] if disaggregate else ["--replicas", str(opts["replicas"])]
    replicas = int(disaggregate.split(":")[1]) if disaggregate else opts["replicas"]
    name = f"disaggregated-{disaggregate.replace(':', '-')}" if disaggregate else policy
    with serving(args, url, replicas, logs / f"fleet-{name}-{workload}.log"):
        row = bench(url, workload, opts["num_requests"], opts["concurrency"], opts["max_tokens"])
        row["requests_per_replica"] = sorted(per_replica_requests(url).values(), reverse=True)
    return row


def run_single(workload: str, opts: dict, logs: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*engine_args(opts["model"], opts["dtype"], opts["threads"]), "--port", str(port)]
    with serving(args, url, None, logs / f"single-{workload}.log"):
        return bench(url, workload, opts["num_requests"], opts["concurrency"], opts["max_tokens"])


def run_vllm_router(workload: str, opts: dict, logs: Path) -> dict:
    """vllm-router --policy cache_aware in front of `replicas` single kvserve servers (threads split)."""
    threads = max(1, opts["threads"] // opts["replicas"])
    ports = [free_port() for _ in range(opts["replicas"])]
    with contextlib.ExitStack() as stack:
        for p in ports:
            args = [*engine_args(opts["model"], opts["dtype"], threads), "--port", str(p)]
            stack.enter_context(serving(args, f"http://127.0.0.1:{p}", None, logs / f"worker-{p}.log"))
        router_port = free_port()
        workers = [f"http://127.0.0.1:{p}" for p in ports]
        cmd = [str(VENV_BIN / "vllm-router"), "--host", "127.0.0.1", "--port", str(router_port), "--policy"]
        out = stack.enter_context((logs / f"vllm-router-{workload}.log").open("w"))
        proc = subprocess.Popen([*cmd, "cache_aware", "--worker-urls", *workers], stdout=out, stderr=out)
        stack.callback(proc.kill)
        url = f"http://127.0.0.1:{router_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        row = bench(url, workload, opts["num_requests"], opts["concurrency"], opts["max_tokens"])
        served = []
        for w in workers:
            text = httpx.get(w + "/metrics", timeout=30).text
            served.append(sum(float(x) for x in re.findall(r"kvserve:request_success_total\{[^}]*\} (\S+)", text)))
        row["requests_per_replica"] = sorted(served, reverse=True)
    return row


def run_real(
    policies: list[str], workloads: list[str], opts: dict, with_vllm_router: bool, disaggregate: str | None = None
) -> dict:
    from tqdm import tqdm

    logs = Path(tempfile.mkdtemp(prefix="kvserve-routing-"))
    rows = []
    systems = [("single", None)] + [("fleet", p) for p in policies] + ([("vllm-router", None)] * with_vllm_router)
    systems += [("disaggregated", disaggregate)] if disaggregate else []
    for workload in workloads:
        for kind, policy in tqdm(systems, desc=workload, unit="system"):
            if kind == "single":
                row = run_single(workload, opts, logs)
            elif kind == "fleet":
                row = run_fleet(policy, workload, opts, logs)
            elif kind == "disaggregated":
                row = run_fleet("cache-aware", workload, opts, logs, disaggregate=policy)
            else:
                row = run_vllm_router(workload, opts, logs)
            system = kind if policy is None else f"disaggregated {policy}" if kind == "disaggregated" else policy
            rows.append({"workload": workload, "system": system, **row})
            print(json.dumps(rows[-1]), flush=True)
    return {"options": opts, "logs": str(logs), "rows": rows, "cpu": os.cpu_count()}
