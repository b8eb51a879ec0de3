"""KV tiers with the real model: a block loaded back from host RAM, disk or Redis gives the same output as no
caching at all (greedy tokens and bitwise logprobs), a restart with the same store is warm, and faults (corrupt
entries, Redis killed mid-run, a full disk) only cost a recompute: requests complete correctly, the fault is
counted and logged once.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from tests.conftest import require_native

DOC = (
    "Kvserve keeps the key and value tensors of every full block of sixteen tokens in a pool, addressed by a "
    "hash chain over the tokens. A request that shares its first tokens with earlier traffic loads them and "
    "computes only the rest. "
) * 3
FLUSH = "The quick brown fox jumps over the lazy dog near the river bank while the sun sets. " * 6
QUESTIONS = ["\nQ: What is addressed by a hash chain?\nA:", "\nQ: What does a request compute?\nA:"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
DTYPE = "bfloat16"
POOL = 12  # blocks: DOC (~9 blocks) is evicted by FLUSH


@pytest.fixture(scope="module")
def reference(ours):
    llm = LLM(loaded=ours, dtype=DTYPE, enable_prefix_caching=False, num_kv_blocks=64)
    return {q: llm.generate(DOC + q, GREEDY)[0] for q in QUESTIONS}


def _shared_blocks(ours) -> int:
    a, b = (ours.tokenizer.encode(DOC + q) for q in QUESTIONS)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return common // 16


def _warm_then_evict(llm: LLM) -> None:
    """Compute DOC's blocks, then push them out of the pool with unrelated traffic."""
    llm.generate(DOC + QUESTIONS[0], GREEDY)
    llm.generate(FLUSH, GREEDY)
    if llm.engine._tiers.store is not None:
        assert llm.engine.flush_kv_store(30)


def _check_same(out, ref) -> None:
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert out.outputs[0].logprobs == ref.outputs[0].logprobs  # bitwise: the loaded KV is the computed KV


def _loaded_back(llm: LLM, ours, reference, tier: str) -> None:
    before = llm.engine.get_stats().tiers[tier].hits
    out = llm.generate(DOC + QUESTIONS[1], GREEDY)[0]
    assert out.num_cached_tokens == _shared_blocks(ours) * 16
    assert llm.engine.get_stats().tiers[tier].hits - before > 0, "nothing came back from the tier"
    _check_same(out, reference[QUESTIONS[1]])
    llm.engine.check_invariants()


def test_host_ram_tier_loads_evicted_blocks_back_exactly(ours, reference):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, cpu_offload_gb=0.05)
    _warm_then_evict(llm)
    assert llm.engine.get_stats().num_evictions > 0
    _loaded_back(llm, ours, reference, "cpu")
    st = llm.engine.get_stats().tiers["cpu"]
    assert st.bytes_loaded == st.hits * llm.engine._runner.kv_cache[:, :, :, 0].nbytes


def test_disk_store_loads_back_exactly_and_survives_a_restart(ours, reference, tmp_path):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    _warm_then_evict(llm)
    _loaded_back(llm, ours, reference, "disk")
    llm.engine.shutdown()
    # A new engine (a restarted server) on the same store: the first request is already warm.
    fresh = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    _loaded_back(fresh, ours, reference, "disk")


def test_store_keys_separate_models_dtypes_and_tenants(ours, reference, tmp_path):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    _warm_then_evict(llm)
    other_dtype = LLM(loaded=ours, dtype="float32", num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    assert other_dtype.generate(DOC + QUESTIONS[1], GREEDY)[0].num_cached_tokens == 0
    tenant = llm.engine.add_request(DOC + QUESTIONS[1], GREEDY, cache_salt="tenant-b")
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += [o for o in llm.engine.step() if o.request_id == tenant]
    assert outputs and outputs[-1].finished
    assert all(o.num_cached_tokens == 0 for o in outputs)


def test_store_keys_separate_attention_arithmetic(ours, tmp_path):
    """KV above layer 0 depends on the attention backend (kernel or torch), which round differently: a replica
    configured for the other backend must not read these blocks, one on the same backend must."""
    require_native()
    kw = dict(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    llm = LLM(**kw, attention_backend="native")
    _warm_then_evict(llm)
    llm.engine.shutdown()
    other = LLM(**kw, attention_backend="torch")
    assert not other.engine.backends.native_attention
    assert other.generate(DOC + QUESTIONS[1], GREEDY)[0].num_cached_tokens == 0
    assert other.engine.get_stats().tiers["disk"].hits == 0
    same = LLM(**kw, attention_backend="native")
    assert same.generate(DOC + QUESTIONS[1], GREEDY)[0].num_cached_tokens > 0
    assert same.engine.get_stats().tiers["disk"].hits > 0


def test_redis_store_loads_back_exactly_and_is_shared_by_replicas(ours, reference, redis_server):
    a = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=redis_server.url)
    _warm_then_evict(a)
    _loaded_back(a, ours, reference, "redis")
    b = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=redis_server.url)  # a second replica
    _loaded_back(b, ours, reference, "redis")


def test_host_and_store_stack(ours, reference, tmp_path):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, cpu_offload_gb=0.05, kv_store=f"disk:{tmp_path}")
    _warm_then_evict(llm)
    _loaded_back(llm, ours, reference, "cpu")  # host RAM is asked first
    assert llm.engine.get_stats().tiers["disk"].hits == 0


# ---------------------------------------------------------------------------------------------- faults
def _fault_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "KV " in r.getMessage()]


def test_corrupt_and_truncated_disk_entries_are_recomputed(ours, reference, tmp_path, caplog):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{tmp_path}")
    _warm_then_evict(llm)
    files = sorted(p for p in tmp_path.rglob("kvserve-*") if p.is_file())
    assert files
    for i, path in enumerate(files):
        data = bytearray(path.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0xFF  # a flipped byte
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(bytes(data[: len(data) // 3]))  # a torn write
    with caplog.at_level(logging.WARNING):
        for q in QUESTIONS:
            out = llm.generate(DOC + q, GREEDY)[0]
            _check_same(out, reference[q])
    st = llm.engine.get_stats().tiers["disk"]
    assert st.corrupt >= 1 and st.hits == 0
    assert len([m for m in _fault_warnings(caplog) if "corrupt" in m]) == 1  # logged once
    llm.engine.check_invariants()


def test_redis_killed_mid_run_costs_only_recompute(ours, reference, redis_server, caplog):
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=redis_server.url)
    _warm_then_evict(llm)
    redis_server.stop()
    with caplog.at_level(logging.WARNING):
        for q in QUESTIONS:  # lookups and write-through both fail; every request still completes
            out = llm.generate(DOC + q, GREEDY)[0]
            _check_same(out, reference[q])
            llm.generate(FLUSH, GREEDY)
        llm.engine.flush_kv_store(30)
    assert llm.engine.get_stats().tiers["redis"].errors >= 1
    assert len([m for m in _fault_warnings(caplog) if "unavailable" in m]) == 1
    assert llm.engine.get_stats().num_used_blocks == 0


def test_redis_restarted_empty_is_filled_again(ours, reference, redis_server):
    """Redis restarts empty while a replica runs: blocks that replica still holds in its pool are written again
    when hit, so a second replica finds them (no stale "already written" memo)."""
    a = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=64, kv_store=redis_server.url)
    a.generate(DOC + QUESTIONS[0], GREEDY)
    assert a.engine.flush_kv_store(30)
    redis_server.stop()
    a.generate(FLUSH, GREEDY)  # its writes and lookups fail while Redis is down
    a.engine.flush_kv_store(30)
    assert a.engine.get_stats().tiers["redis"].errors >= 1
    redis_server.start()  # back, empty
    a.engine._tiers.store._down_until = 0.0  # as if the store's 5 s back-off after a failure had passed
    out = a.generate(DOC + QUESTIONS[1], GREEDY)[0]
    assert out.num_cached_tokens == _shared_blocks(ours) * 16  # from a's pool
    _check_same(out, reference[QUESTIONS[1]])
    assert a.engine.flush_kv_store(30)
    b = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=redis_server.url)  # a second replica
    _loaded_back(b, ours, reference, "redis")


@contextlib.contextmanager
def _full_disk(tmp_path: Path):
    """A directory on a 400 KiB tmpfs (fills after one block) or, without mount rights, a file-size limit."""
    root = tmp_path / "tiny"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode == 0:
        try:
            yield root
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
        return
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, old[1]))
    try:
        yield root
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_full_disk_costs_only_recompute(ours, reference, tmp_path, caplog):
    with _full_disk(tmp_path) as root, caplog.at_level(logging.WARNING):
        llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=f"disk:{root}")
        _warm_then_evict(llm)
        for q in QUESTIONS:
            _check_same(llm.generate(DOC + q, GREEDY)[0], reference[q])
        llm.engine.flush_kv_store(30)
    st = llm.engine.get_stats().tiers["disk"]
    assert st.errors >= 1
    assert len([m for m in _fault_warnings(caplog) if "unavailable" in m]) == 1
    assert not list(root.rglob(".tmp-*")), "a failed write left a temp file behind"


def test_bounded_disk_store_stays_within_its_bytes(ours, reference, tmp_path):
    """--kv-store-max-bytes: the files never exceed the bound (LRU out, counted), and what is left still loads
    back exactly."""
    block = 30 * 2 * 3 * 16 * 64 * 2  # layers x K/V x kv heads x block x head dim x bf16 bytes, before the header
    bound = 6 * block
    llm = LLM(loaded=ours, dtype=DTYPE, num_kv_blocks=POOL, kv_store=str(tmp_path), kv_store_max_bytes=bound)
    _warm_then_evict(llm)
    held = sum(p.stat().st_size for p in tmp_path.rglob("kvserve-*"))
    assert 0 < held <= bound
    assert llm.engine.get_stats().tiers["disk"].evictions > 0
    out = llm.generate(DOC + QUESTIONS[1], GREEDY)[0]  # whatever prefix survived, the answer is exact
    _check_same(out, reference[QUESTIONS[1]])
    llm.engine.check_invariants()


def test_bad_store_specs_fail_at_start(ours):
    with pytest.raises(ValueError, match="kv_store must be PATH, disk:PATH or redis://"):
        LLM(loaded=ours, kv_store="s3://bucket")
    with pytest.raises(ValueError, match="kv_store_max_bytes bounds a disk"):
        LLM(loaded=ours, kv_store="redis://127.0.0.1:1/0", kv_store_max_bytes=1 << 20)
    with pytest.raises(ValueError, match="kv_store_max_bytes bounds a disk"):
        LLM(loaded=ours, kv_store_max_bytes=1 << 20)
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        LLM(loaded=ours, eviction_policy="fifo")
