"""KV tiers behind the HTTP server: per-tier metrics on /metrics, warm restart from the same disk store, and a
Redis store killed mid-run leaves the server healthy (requests recompute; the fault is counted)."""

from __future__ import annotations

DOC = "The pool keeps every full block of sixteen tokens, addressed by a hash chain over its tokens. " * 8
FLUSH = "Rivers carry sand to the sea, and the tide spreads it along the coast in long pale bars. " * 8


def _complete(srv, prompt: str) -> dict:
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def _cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tier_metrics_and_warm_restart_from_disk(server_factory, tmp_path):
    store = f"disk:{tmp_path}"
    srv = server_factory(num_kv_blocks=16, cpu_offload_gb=0.05, kv_store=store)
    _complete(srv, DOC + "Q1")
    _complete(srv, FLUSH)  # evicts DOC from the 16-block pool into host RAM
    body = _complete(srv, DOC + "Q2")
    assert _cached(body) >= 128
    m = srv.metrics()
    assert m['kvserve:kv_tier_hits_total{tier="cpu"}'] > 0
    assert m['kvserve:kv_tier_bytes_stored_total{tier="disk"}'] > 0
    assert m["kvserve:kv_tier_cpu_bytes"] > 0
    assert m['kvserve:kv_tier_faults_total{kind="corrupt",tier="disk"}'] == 0
    srv.stop()  # flushes pending writes to the store
    again = server_factory(num_kv_blocks=16, kv_store=store)
    body = _complete(again, DOC + "Q3")
    assert _cached(body) >= 128  # warm at once, from disk
    assert again.metrics()['kvserve:kv_tier_hits_total{tier="disk"}'] > 0
    again.stop()


def test_redis_down_mid_run_keeps_the_server_healthy(server_factory, redis_server):
    srv = server_factory(num_kv_blocks=16, kv_store=redis_server.url)
    first = _complete(srv, DOC + "Q1")
    redis_server.stop()
    _complete(srv, FLUSH)
    body = _complete(srv, DOC + "Q2")  # the lookup fails: recomputed, same answer shape
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 4
    assert first["choices"][0]["finish_reason"] == "length"
    with srv.client() as c:
        assert c.get("/health").status_code == 200
    m = srv.metrics()
    assert m['kvserve:kv_tier_faults_total{kind="unavailable",tier="redis"}'] >= 1
    srv.wait_idle()
    srv.stop()
