"""Routing policies, the fleet's block index and the KV event log, against brute force (no Ray, no model)."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.events import KVEventBatch, KVEventLog, block_key
from kvserve.kv.hashing import hash_block_chain
from kvserve.router.index import BlockIndex
from kvserve.router.policies import CacheAware, LeastLoad, PrefixAware, ReplicaLoad, RoundRobin, RouteRequest
from kvserve.router.router import Router, request_keys

BS = 4


def loads(*names: str, **kw) -> list[ReplicaLoad]:
    return [ReplicaLoad(n, **kw) for n in names]


def brute_match(held: dict[str, set[int]], keys: list[int]) -> dict[str, int]:
    out = {}
    for name, blocks in held.items():
        depth = 0
        while depth < len(keys) and keys[depth] in blocks:
            depth += 1
        if depth:
            out[name] = depth
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_index_match_equals_brute_force_under_random_updates(data):
    index, held = BlockIndex(), {}
    names = [f"r{i}" for i in range(data.draw(st.integers(1, 70)))]  # past 64: slots beyond one machine word
    keyspace = st.integers(0, 12)
    for _ in range(data.draw(st.integers(1, 40))):
        name = data.draw(st.sampled_from(names))
        op = data.draw(st.sampled_from(["add", "remove", "forget"]))
        keys = data.draw(st.lists(keyspace, max_size=6))
        if op == "add":
            index.add(name, keys)
            held.setdefault(name, set()).update(keys)
        elif op == "remove":
            index.remove(name, keys)
            held.get(name, set()).difference_update(keys)
        else:
            index.forget(name)
            held.pop(name, None)
        query = data.draw(st.lists(keyspace, max_size=8))
        assert index.match(query) == brute_match(held, query)
        assert len(index) == len(set().union(*held.values()) if held else set())
        for n in names:
            assert index.num_blocks(n) == len(held.get(n, ()))


def test_event_log_folds_each_key_to_its_last_state_and_numbers_batches():
    log = KVEventLog()
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    log.stored(a)
    log.stored(b)
    log.removed(a)
    first = log.drain()
    assert first == KVEventBatch(1, (block_key(b),), (block_key(a),), reset=True)
    assert log.drain() is None  # nothing happened: no batch, no seq spent
    log.removed(c)
    log.stored(c)
    assert log.drain() == KVEventBatch(2, (block_key(c),), ())


def test_event_log_overflow_resets_instead_of_growing():
    log = KVEventLog(max_events=3)
    log.drain()
    for i in range(5):
        log.stored(bytes([i]) * 32)
    batch = log.drain()
    assert batch.reset and len(batch.stored) == 2  # the two after the overflow


def test_pool_events_mirror_the_pool_index_exactly():
    """Replaying a pool's events into an index leaves exactly the pool's cached blocks indexed."""
    rng = random.Random(0)
    pool = BlockPool(8)
    pool.events = KVEventLog()
    index = BlockIndex()
    held = []
    for step in range(300):
        if held and rng.random() < 0.5:
            pool.free([held.pop(rng.randrange(len(held)))])
        elif pool.num_free_blocks:
            (blk,) = pool.allocate(1)
            tokens = [rng.randrange(6) for _ in range(BS)]
            (h,) = hash_block_chain(tokens, BS)
            pool.cache_block(blk, h, tokens)
            held.append(blk)
        if step % 7 == 0 and (batch := pool.events.drain()) is not None:
            index.apply("r", batch)
        pool.check_invariants()
    if (batch := pool.events.drain()) is not None:
        index.apply("r", batch)
    cached = {block_key(b.block_hash) for b in pool.blocks if b.block_hash is not None}
    assert {k for k in cached if index.holds("r", k)} == cached
    assert index.num_blocks("r") == len(cached)


def test_lost_batch_forgets_the_replica_then_relearns():
    index = BlockIndex()
    assert index.apply("r", KVEventBatch(1, (1, 2), (), reset=True))
    assert not index.apply("r", KVEventBatch(3, (5,), ()))  # batch 2 lost
    assert not index.holds("r", 1) and index.holds("r", 5)
    assert index.apply("r", KVEventBatch(4, (6,), (5,)))
    assert index.num_blocks("r") == 1


def test_request_keys_follow_the_engine_chain_and_the_salt_separates_tenants():
    tokens = list(range(10))
    assert request_keys(tokens, BS) == [block_key(h) for h in hash_block_chain(tokens, BS)]
    assert len(request_keys(tokens, BS)) == 2  # full blocks only
    assert set(request_keys(tokens, BS, "tenant-a")).isdisjoint(request_keys(tokens, BS, "tenant-b"))
    assert set(request_keys(tokens, BS, "tenant-a")).isdisjoint(request_keys(tokens, BS))


def test_round_robin_and_least_load():
    rr, req = RoundRobin(), RouteRequest([], 8, BS)
    assert [rr.choose(req, loads("b", "a"), {}).replica for _ in range(4)] == ["a", "b", "a", "b"]
    ll = LeastLoad()
    busy = [ReplicaLoad("a", running=3), ReplicaLoad("b", running=1, waiting=1), ReplicaLoad("c", in_flight=5)]
    assert ll.choose(req, busy, {}).replica == "b"
    tie = [ReplicaLoad("a", running=1, kv_usage=0.5), ReplicaLoad("b", running=1, kv_usage=0.2)]
    assert ll.choose(req, tie, {}).replica == "b"


def test_prefix_aware_takes_the_longest_match_however_busy():
    req = RouteRequest(list(range(10)), 40, BS)
    replicas = [ReplicaLoad("a", running=50), ReplicaLoad("b")]
    d = PrefixAware().choose(req, replicas, {"a": 8, "b": 2})
    assert (d.replica, d.reason, d.matched_tokens) == ("a", "prefix", 32)
    assert PrefixAware().choose(req, replicas, {}).replica == "b"


def test_cache_aware_prefers_the_match_until_its_replica_is_busier_than_it_is_worth():
    req = RouteRequest(list(range(250)), 1000, BS)  # 1,000-token prompt, 992 of them cached on "a"
    matches = {"a": 248}
    policy = CacheAware()
    assert policy.choose(req, loads("a", "b"), matches).replica == "a"
    # a's queued prefill delays this request: once it is worth more than the 992 cached tokens, b is cheaper
    assert policy.choose(req, [ReplicaLoad("a", queued_tokens=900), ReplicaLoad("b")], matches).replica == "a"
    d = policy.choose(req, [ReplicaLoad("a", queued_tokens=1100), ReplicaLoad("b")], matches)
    assert (d.replica, d.reason, d.matched_tokens) == ("b", "cost", 0)
    assert policy.choose(req, [ReplicaLoad("a", running=200), ReplicaLoad("b")], matches).replica == "b"
    # a nearly full KV pool counts against a replica
    full = [ReplicaLoad("a", kv_usage=1.0), ReplicaLoad("b")]
    assert policy.choose(RouteRequest([], 100, BS), full, {}).replica == "b"


def test_router_learns_from_decisions_and_events():
    router = Router("prefix-aware", BS)
    tokens = list(range(40))
    req = router.request(tokens)
    first = router.route(req, loads("a", "b"))
    again = router.route(router.request(tokens + [1, 2]), loads("a", "b"))
    assert again.replica == first.replica and again.matched_tokens == 40
    # the engine evicted the prefix: the index forgets it, and the next request is a no-match
    router.apply(first.replica, KVEventBatch(1, (), tuple(req.block_keys), reset=True))
    assert router.route(router.request(tokens), loads("a", "b")).reason == "no-match"
    router.set_replicas(["b"])
    assert "a" not in router.index.replicas
    with pytest.raises(ValueError, match="no replica"):
        router.route(req, [])


def test_cache_aware_spreads_a_hot_prefix_and_round_robin_dilutes_it():
    """A burst of requests sharing a long prefix, none finishing: cache-aware keeps most of the hits yet uses
    both replicas; prefix-aware pins every request to one; round-robin splits the prefix's first computations."""
    prefix = list(range(1000))
    outcome = {}
    for name in ("cache-aware", "prefix-aware", "round-robin"):
        router, in_flight = Router(name, 16), {"a": 0, "b": 0}
        for i in range(40):
            req = router.request(prefix + [10_000 + i] * 24)
            d = router.route(req, [ReplicaLoad(r, in_flight=n) for r, n in in_flight.items()])
            in_flight[d.replica] += 1
        outcome[name] = (in_flight, router.matched_tokens)
    assert min(outcome["cache-aware"][0].values()) >= 5  # the router counts the tokens it sent a replica
    assert max(outcome["prefix-aware"][0].values()) == 40
    assert outcome["cache-aware"][1] >= 0.9 * outcome["prefix-aware"][1]


def test_sent_tokens_count_against_a_replica_until_its_report_covers_them():
    router = Router("cache-aware", BS)
    req = RouteRequest([], 1000, BS)  # nothing cached anywhere: the least queued replica wins
    assert router.route(req, loads("a", "b")).replica == "a"
    assert router.route(req, loads("a", "b")).replica == "b"  # a's 1,000 sent tokens are not reported yet
    before = time.time() - 60
    router.reported("a", before)  # a report taken before the send: it cannot count it
    router.reported("b")  # b's report counts everything
    assert router.route(req, loads("a", "b")).replica == "b"
    router.reported("a", time.time())
    assert router.pending["a"] == []


def test_a_request_sent_elsewhere_moves_its_claim():
    """Serve may send a request to its second-ranked replica; the index must not keep the first one's claim."""
    router = Router("prefix-aware", BS)
    held = router.request(list(range(8)))
    router.index.add("a", held.block_keys)  # a holds the first 2 blocks
    req = router.request(list(range(20)))  # 5 blocks: 2 held by a, 3 new
    d = router.route(req, loads("a", "b"))
    assert d.replica == "a" and router.index.num_blocks("a") == 5
    router.moved(req, d, "b")
    assert router.index.num_blocks("a") == 2  # what a held before stays
    assert router.index.match(req.block_keys) == {"b": 5, "a": 2}
    assert sum(n for _, n in router.pending["b"]) == 20 - 8 and not router.pending["a"]


def test_a_refused_request_gives_back_only_what_it_claimed():
    router = Router("prefix-aware", BS)
    router.index.add("a", router.request(list(range(8))).block_keys)  # a holds 2 blocks
    req = router.request(list(range(20)))
    d = router.route(req, loads("a", "b"))
    router.unclaim(req, d, d.replica)
    assert router.index.num_blocks("a") == 2 and router.index.match(req.block_keys) == {"a": 2}
