"""A real engine's KV events drive the router's index: what the engine caches is indexed, what it evicts is
forgotten, and a repeated prefix is routed to the engine that holds it (no Ray: the Router is plain Python)."""

from __future__ import annotations

from kvserve import LLM, SamplingParams
from kvserve.kv.events import block_key
from kvserve.router.policies import ReplicaLoad
from kvserve.router.router import Router

PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def cached_keys(llm: LLM) -> set[int]:
    pool = llm.engine._parts.pool  # the engine's own pool, to compare the index against
    return {block_key(b.block_hash) for b in pool.blocks if b.block_hash is not None}


def feed(router: Router, name: str, llm: LLM) -> None:
    if (batch := llm.engine.drain_kv_events()) is not None:
        router.apply(name, batch)


def test_index_follows_the_engine_through_caching_and_eviction(ours):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=24, block_size=16)
    router = Router("prefix-aware", llm.engine.block_size)
    feed(router, "a", llm)  # recording starts here
    doc = list(range(1000, 1000 + 160))  # 10 full blocks
    llm.generate([{"prompt_token_ids": doc}], PARAMS)
    feed(router, "a", llm)
    keys = router.request(doc).block_keys
    assert all(router.index.holds("a", k) for k in keys)
    assert {k for k in cached_keys(llm) if router.index.holds("a", k)} == cached_keys(llm)
    d = router.route(router.request(doc + [7, 8]), [ReplicaLoad("a"), ReplicaLoad("b")])
    assert (d.replica, d.reason, d.matched_tokens) == ("a", "prefix", 160)

    # other prompts fill the 24-block pool: the document's blocks are evicted, and the index forgets them
    for i in range(3):
        llm.generate([{"prompt_token_ids": list(range(5000 + 200 * i, 5000 + 200 * i + 180))}], PARAMS)
    feed(router, "a", llm)
    still = cached_keys(llm)
    assert not any(k in still for k in keys[:1])  # evicted from the engine...
    assert not any(router.index.holds("a", k) for k in keys if k not in still)  # ...and from the index
    assert router.index.num_blocks("a") == len(still)
    assert router.route(router.request(doc), [ReplicaLoad("a"), ReplicaLoad("b")]).reason == "no-match"
    llm.engine.check_invariants()


def test_cache_salt_keeps_tenants_apart_in_the_index(ours):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=64, block_size=16)
    router = Router("prefix-aware", 16)
    feed(router, "a", llm)
    doc = list(range(2000, 2064))
    llm.generate([{"prompt_token_ids": doc}], PARAMS, cache_salt="tenant-1")
    feed(router, "a", llm)
    assert router.index.match(router.request(doc, "tenant-1").block_keys) == {"a": 4}
    assert router.index.match(router.request(doc, "tenant-2").block_keys) == {}
    assert router.index.match(router.request(doc).block_keys) == {}
