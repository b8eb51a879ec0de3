"""A real fleet: Ray Serve on a local Ray bound to 127.0.0.1, two engine replicas of the bundled model behind the
ingress, routed by cache-aware routing. One fleet for the module (Ray and Serve take ~10-40 s to start here).

What one server promises holds through the fleet (tokens equal a single engine's, SSE ends with [DONE], 4xx
bodies, API key, cache_salt), a repeated prefix goes to the replica that holds it, a hot prefix spreads over
both replicas, and a killed replica fails only its own requests.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.server.app import ServerOptions

ray = pytest.importorskip("ray")
launch = pytest.importorskip("kvserve.fleet.launch")

API_KEY = "fleet-key"
ENGINE = dict(model="smollm2-135m", dtype="float32", device="cpu", num_kv_blocks=192, max_num_seqs=8, seed=0)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
DOC = "The fleet shares one hash chain with its engines, so the router knows where every block lives. " * 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet():
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    server = ServerOptions(port=port, api_key=API_KEY, threads=1)
    options = launch.FleetOptions(replicas=2, routing="cache-aware")
    launch.start_ray(options, server)
    try:
        state = launch.deploy(EngineConfig(**ENGINE), server, options)  # noqa: F841 - keeps the state actor alive
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=120)
        _wait_healthy(client, 2)
        yield client
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _wait_healthy(client: httpx.Client, replicas: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = client.get("/health")
            if r.status_code == 200 and r.json().get("replicas") == replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the fleet did not report {replicas} healthy replicas in {timeout} s")


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _per_replica(text: str, name: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for replica in set(re.findall(r'replica="([^"]+)"', text)):
        out[replica] = _metric(text, name, replica=replica, **labels)
    return out


def _complete(client: httpx.Client, prompt: str, **kw) -> dict:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def single(ours):
    return LLM(loaded=ours, **{k: v for k, v in ENGINE.items() if k != "model"})


def test_greedy_tokens_and_stream_equal_a_single_engine(fleet, single):
    prompts = ["The capital of France is", "def fibonacci(n):", DOC + "Summarise:"]
    want = [o.outputs[0].text for o in single.generate(prompts, SamplingParams(temperature=0, max_tokens=8))]
    got = [_complete(fleet, p)["choices"][0]["text"] for p in prompts]
    assert got == want
    body = {"model": "smollm2-135m", "prompt": prompts[0], "max_tokens": 8, "temperature": 0, "stream": True}
    with fleet.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want[0]


def test_errors_api_key_and_tokenize_are_the_single_servers(fleet):
    r = fleet.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = fleet.post("/v1/completions", json={"prompt": "x", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"]
    too_long = {"prompt": [1] * 9000, "max_tokens": 4}
    r = fleet.post("/v1/completions", json=too_long)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(str(fleet.base_url) + "/v1/completions", json={"prompt": "x"})  # no key
    assert r.status_code == 401
    r = fleet.post("/tokenize", json={"prompt": "hello world"})
    assert r.status_code == 200 and r.json()["count"] == 2


def test_repeated_prefix_goes_to_the_replica_holding_it(fleet):
    first = _complete(fleet, DOC + "Question 1?")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 or True  # an earlier test may share it
    before = fleet.get("/metrics").text
    for i in range(3):
        time.sleep(0.2)  # the KV events reach the router
        usage = _complete(fleet, DOC + f"Question {i + 2}?")["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 16 * (usage["prompt_tokens"] // 16) - 16
    after = fleet.get("/metrics").text
    gained = {
        r: after_hits - _per_replica(before, "kvserve:prefix_cache_hits_total").get(r, 0)
        for r, after_hits in _per_replica(after, "kvserve:prefix_cache_hits_total").items()
    }
    assert sorted(v > 0 for v in gained.values()) == [False, True]  # every hit on one replica
    assert _metric(after, "kvserve:router_decisions_total", reason="prefix") >= 3
    assert _metric(after, "kvserve:router_index_blocks") > 0


def test_cache_salt_separates_tenants_through_the_fleet(fleet):
    prompt = DOC + "Salted?"
    _complete(fleet, prompt, cache_salt="tenant-a")
    time.sleep(0.2)
    assert _complete(fleet, prompt, cache_salt="tenant-a")["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert _complete(fleet, prompt, cache_salt="tenant-b")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_hot_prefix_burst_uses_both_replicas(fleet):
    """A burst of requests that share a long prefix and each bring a long question of their own: the replica
    holding the prefix queues their prefill, and once its queue is worth more than the prefix, requests go to
    the other replica (which then caches the prefix too)."""
    before = _per_replica(fleet.get("/metrics").text, "kvserve:request_success_total")
    hot = "A hot system prompt that every request of the burst starts with, long enough to matter. " * 36
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()
    results = []

    def one(i: int) -> None:
        question = " ".join(words[(i * 7 + j * 3) % len(words)] + str(j % (i + 2)) for j in range(60))
        results.append(_complete(fleet, hot + f"Request {i}: {question}", max_tokens=4, ignore_eos=True))

    _complete(fleet, hot + "Warm-up.", max_tokens=1)  # one replica holds the prefix
    time.sleep(0.3)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 10
    after = _per_replica(fleet.get("/metrics").text, "kvserve:request_success_total")
    served = {r: after[r] - before.get(r, 0) for r in after}
    assert len(served) == 2 and min(served.values()) >= 1, served
    hits = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
    assert hits >= 8 * 512  # most requests still found the prefix cached


def test_metrics_label_replicas_and_count_the_fleet(fleet):
    text = fleet.get("/metrics").text
    replicas = set(re.findall(r'replica="([^"]+)"', text))
    assert len(replicas) == 2
    total = _metric(text, "kvserve:prompt_tokens_total") - sum(
        _per_replica(text, "kvserve:prompt_tokens_total").values()
    )
    assert total == pytest.approx(sum(_per_replica(text, "kvserve:prompt_tokens_total").values()))
    assert 0 < _metric(text, "kvserve:fleet_prefix_cache_hit_rate") < 1
    assert fleet.get("/health").json() == {"status": "ok", "replicas": 2}


def test_the_index_forgets_what_the_engines_evict(fleet):
    """16 distinct 29-block prompts overflow the two 192-block pools: without the engines' eviction events the
    router's index would keep every block it routed; with them it holds at most what the pools hold."""
    for i in range(16):
        _complete(fleet, f"Ticket {i}: " + " ".join(f"w{i}x{j}" for j in range(90)), max_tokens=1)
    time.sleep(0.5)
    _complete(fleet, "One more request, so the router pulls the last events.", max_tokens=1)
    assert 0 < _metric(fleet.get("/metrics").text, "kvserve:router_index_blocks") <= 2 * ENGINE["num_kv_blocks"]


def test_killed_replica_fails_only_its_own_requests(fleet):
    """Streams on both replicas; one replica is killed: its streams end with an error event, the others
    finish, nothing hangs, Serve replaces the replica and the fleet serves again."""
    outcomes: list[str] = []

    def stream(i: int) -> None:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
        try:
            with fleet.stream("POST", "/v1/completions", json=body) as r:
                lines = [line for line in r.iter_lines() if line]
            errored = any('"error"' in line for line in lines)
            outcomes.append("error" if errored else "done" if lines[-1] == "data: [DONE]" else "cut")
        except httpx.HTTPError:
            outcomes.append("cut")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    running: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while sum(running.values()) < 6 and time.monotonic() < deadline:  # every stream admitted somewhere
        time.sleep(0.5)
        running = _per_replica(fleet.get("/metrics").text, "kvserve:num_requests_running")
    victim = max(running, key=running.get)  # a replica that is serving streams
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    assert len(names) == 2
    ray.kill(ray.get_actor(next(n for n in names if n.endswith(victim)), namespace="serve"), no_restart=True)
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert "error" in outcomes and "cut" not in outcomes, outcomes
    assert outcomes.count("done") == 6 - running[victim], (outcomes, running)  # the other replica's all finished
    _wait_healthy(fleet, 2)
    assert _complete(fleet, "After the failure,")["choices"][0]["text"]
