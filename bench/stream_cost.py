"""Server-side CPU time per streamed token over a long answer: does the serving path cost O(1) per token?

    .venv/bin/python bench/stream_cost.py [--tokens 4000] [--real-model]

Starts `kvserve serve`'s app in a child process on 127.0.0.1 and streams one completion of --tokens tokens
(ignore_eos, logprobs=1 and a stop string, so the logprob and stop-string paths run too), reading the child's
CPU time (user + system, /proc/PID/stat) after each thousand tokens arrive. By default the model's forward is
stubbed out (the runner sleeps 2 ms, using no CPU, and answers every sampling row with one fixed token), so
what is timed is everything else: scheduling, the engine's bookkeeping, detokenization, stop checks, output
building, the event loop, SSE. The sleep paces the server so it cannot run ahead of the client: CPU time read
when token t arrives is the CPU time spent producing the first t tokens. With
--real-model the model runs too (its attention grows with the context, so its per-token time grows).
Prints one row per thousand tokens and writes bench/results/stream_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import sys, time, uvicorn
from kvserve.config import EngineConfig
from kvserve.server.app import build_app
stub, port, tokens = sys.argv[1] == "stub", int(sys.argv[2]), int(sys.argv[3])
config = EngineConfig(dtype="bfloat16", device="cpu", num_kv_blocks=tokens // 16 + 64, max_model_len=tokens + 256)
app = build_app(config)
if stub:
    from kvserve.model.sampler import SampleResult
    engine = app.state.async_engine.engine
    token, result = 260, SampleResult(260, -0.5, {260: -0.5})  # one ordinary token, again and again
    try:
        from kvserve.model.batch import ModelOutput
        def execute(batch):
            time.sleep(0.002)
            return ModelOutput(samples={s.seq_id: result for s in batch.seqs if s.sampling is not None})
        engine._runner.execute = execute
    except ImportError:  # an engine from before ModelBatch, for comparison
        def old_execute(sched):
            time.sleep(0.002)
            return {s.request.request_id: result for s in sched.scheduled if s.samples}
        engine.runner.execute = old_execute
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--real-model", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "stream_cost.json"))
    args = ap.parse_args()
    port = free_port()
    mode = "real" if args.real_model else "stub"
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(port), str(args.tokens)])
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        body = {"prompt": "Tell me a long story.", "max_tokens": args.tokens, "ignore_eos": True,
                "logprobs": 1, "stop": ["never appears"], "stream": True}  # fmt: skip
        rows, received, chunks, mark = [], 0, 0, args.every
        cpu0, wall0 = cpu_seconds(child.pid), time.perf_counter()
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=None) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                lp = chunk["choices"][0]["logprobs"] if chunk["choices"] else None
                received += len(lp["tokens"]) if lp else 0
                chunks += 1
                while received >= mark:
                    cpu, wall = cpu_seconds(child.pid), time.perf_counter()
                    rows.append({"tokens": f"{mark - args.every}-{mark}", "chunks": chunks,
                                 "cpu_ms_per_token": (cpu - cpu0) * 1e3 / args.every,
                                 "wall_ms_per_token": (wall - wall0) * 1e3 / args.every})  # fmt: skip
                    cpu0, wall0, mark, chunks = cpu, wall, mark + args.every, 0
        assert received == args.tokens, f"received {received} of {args.tokens} tokens"
    finally:
        child.terminate()
        child.wait(30)
    print(f"{'tokens':>12} {'SSE chunks':>10} {'server CPU ms/token':>20} {'wall ms/token':>14}   (model: {mode})")
    for row in rows:
        cpu, wall = row["cpu_ms_per_token"], row["wall_ms_per_token"]
        print(f"{row['tokens']:>12} {row['chunks']:>10} {cpu:>20.3f} {wall:>14.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": mode, "tokens": args.tokens, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
