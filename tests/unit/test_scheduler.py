"""Scheduler without a model: token budget, chunked prefill, prefix hits at admission, preemption."""

from __future__ import annotations

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.scheduler import PROMPT_LOGPROBS_CHUNK, Scheduler, SchedulerLimits

BS = 4


def make(num_blocks=32, budget=16, seqs=8, threshold=None):
    kv = KVCacheManager(BlockPool(num_blocks), BS)
    return Scheduler(SchedulerLimits(budget, seqs, threshold), kv), kv


def req(rid, tokens, max_tokens=8):
    return Request(rid, list(tokens), SamplingParams(temperature=0, max_tokens=max_tokens))


def run_step(sched, token=7):
    """Pretend the model ran: advance and append a token for every request whose chunk reached its end."""
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.scheduled:
        if s.request.num_computed_tokens == s.request.num_tokens:
            s.request.append_output_token(token)
    sched.kv.check_invariants()
    return out


def test_long_prompt_is_chunked_by_the_budget():
    sched, _ = make(budget=10)
    r = req("a", range(25))
    sched.add_request(r)
    sizes = [run_step(sched).scheduled[0].num_new_tokens for _ in range(4)]
    assert sizes == [10, 10, 5, 1]  # three prefill chunks, then one decode token
    assert r.num_output_tokens == 2


def test_decodes_and_prefill_chunk_share_a_step():
    sched, _ = make(budget=8)
    a = req("a", range(4))
    sched.add_request(a)
    run_step(sched)  # a prefilled, has 1 output
    b = req("b", range(100, 120))
    sched.add_request(b)
    out = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_long_prefill_threshold_caps_a_chunk():
    sched, _ = make(budget=16, threshold=5)
    sched.add_request(req("a", range(12)))
    assert run_step(sched).scheduled[0].num_new_tokens == 5


def test_prefix_hit_is_counted_at_admission_and_skips_compute():
    sched, kv = make()
    a = req("a", list(range(10)))
    sched.add_request(a)
    run_step(sched)
    b = req("b", list(range(9)) + [50, 51])  # shares 9 tokens = 2 full blocks
    sched.add_request(b)
    out = run_step(sched)
    sb = [s for s in out.scheduled if s.request is b][0]
    assert b.num_cached_tokens == 8 and sb.num_new_tokens == 3
    assert kv.block_ids(a)[:2] == kv.block_ids(b)[:2]  # shared, not copied
    assert kv.prefix_hits == 8 and kv.prefix_queries == 21


def test_a_request_scoring_its_prompt_takes_no_prefix_hit_and_small_chunks():
    """prompt_logprobs needs logits at every prompt position: no prefix hit until they are all recorded, and
    chunks of at most PROMPT_LOGPROBS_CHUNK tokens (their logits are kept)."""
    sched, kv = make(num_blocks=400, budget=2048)
    a = req("a", list(range(600)))
    sched.add_request(a)
    run_step(sched)
    b = Request("b", list(range(600)), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    sched.add_request(b)
    out = run_step(sched)
    assert b.num_cached_tokens == 0 and [s.num_new_tokens for s in out.scheduled if s.request is b] == [
        PROMPT_LOGPROBS_CHUNK
    ]
    assert b.needs_prompt_logprobs  # nothing recorded them here (no model)
    b.prompt_logprobs += [0.0] * 599  # as the runner does, once all are scored
    assert not b.needs_prompt_logprobs
    c = Request("c", list(range(600)), SamplingParams(temperature=0, max_tokens=2))
    assert kv.get_computed_blocks(c).num_tokens == 596  # the others hit the cache as before
    assert kv.prefix_queries == 600  # b did not look the cache up, so it is not counted as a miss


def test_prompt_scoring_rows_are_bounded_per_step_over_all_requests():
    sched, _ = make(num_blocks=800, budget=2048)
    scoring = [
        Request(f"s{i}", list(range(1000 * i, 1000 * i + 400)), SamplingParams(max_tokens=1, prompt_logprobs=0))
        for i in range(3)
    ]
    plain = req("p", range(5000, 5300))
    for r in scoring + [plain]:
        sched.add_request(r)
    out = run_step(sched)
    sizes = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert sizes == {"s0": 400, "s1": PROMPT_LOGPROBS_CHUNK - 400}  # s2 waits (FIFO), and so does p behind it
    out = run_step(sched)  # s1 goes on, s2 gets the rest of this step's rows, p its tokens
    sizes = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert (
        sizes["s1"] == 400 - (PROMPT_LOGPROBS_CHUNK - 400)
        and sum(n for rid, n in sizes.items() if rid.startswith("s")) <= PROMPT_LOGPROBS_CHUNK
    )


def test_identical_prompt_still_recomputes_last_token():
    sched, _ = make()
    sched.add_request(req("a", range(8)))
    run_step(sched)
    b = req("b", range(8))
    sched.add_request(b)
    run_step(sched)
    assert b.num_cached_tokens == 4  # 8 tokens = 2 blocks, but the last token must run to give logits


def test_max_num_seqs_limits_admission():
    sched, _ = make(seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", range(i * 10, i * 10 + 3)))
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_out_of_blocks_preempts_newest_then_resumes_it():
    sched, kv = make(num_blocks=4, budget=64)
    a = req("a", range(6), max_tokens=20)
    b = req("b", range(100, 106), max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # each holds 2 blocks (7 slots needed after first token)
    preempted = []
    for _ in range(6):
        out = run_step(sched)
        preempted += out.preempted
    assert preempted and preempted[0] is b  # the newest goes
    assert b.num_preemptions >= 1 and a.status == RequestStatus.RUNNING
    assert a.num_output_tokens == 7  # a never stalled
    sched.finish_request(a, RequestStatus.FINISHED_LENGTH)
    out = run_step(sched)
    assert [s.request for s in out.scheduled] == [b] and b.status == RequestStatus.RUNNING
    # Prompt tokens computed count the recompute (caching is on, so b resumes from its own cached full block)
    assert a.num_prompt_tokens_computed == 6
    cached_on_return = 4  # b's first full block (tokens 100-103) was still in the prefix cache
    assert b.num_prompt_tokens_computed == 6 + b.num_preemptions * (6 - cached_on_return)
    sched.finish_request(b, RequestStatus.FINISHED_ABORTED)
    assert kv.pool.num_used_blocks == 0


def test_prompt_tokens_computed_counts_chunks_and_a_prefix_hit():
    sched, _ = make(budget=4)
    a = req("a", range(10))
    sched.add_request(a)
    for _ in range(3):
        run_step(sched)
    assert a.num_prompt_tokens_computed == 10 and a.num_output_tokens == 1  # 4 + 4 + 2, then decodes add none
    run_step(sched)
    assert a.num_prompt_tokens_computed == 10
    b = req("b", list(range(9)) + [70])
    sched.add_request(b)
    run_step(sched)
    run_step(sched)
    assert b.num_cached_tokens == 8 and b.num_prompt_tokens_computed == 2


def test_finish_waiting_request_frees_nothing_and_removes_it():
    sched, kv = make()
    r = req("a", range(5))
    sched.add_request(r)
    sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting and r.is_finished and kv.pool.num_used_blocks == 0


def test_running_requests_keep_stepping_while_a_store_lookup_is_in_flight(tmp_path):
    import threading

    import torch

    from kvserve.kv.hashing import hash_block_chain
    from kvserve.kv.tiers import DiskStore, TieredCache
    from kvserve.kv.tiers.codec import encode_block
    from kvserve.model.block_io import TorchBlockIO

    gate = threading.Event()

    class SlowDisk(DiskStore):  # a real disk store whose reads wait for the test
        def get_prefix(self, keys):
            assert gate.wait(10)
            return super().get_prefix(keys)

    kv_tensor = torch.zeros(1, 2, 1, 32, BS, 2)  # (layers, K/V, kv_heads, blocks, block_size, head_dim)
    io = TorchBlockIO(kv_tensor)
    tiers = TieredCache(io, "test", store=SlowDisk(tmp_path))
    sched, kv = make()
    kv.tiers = tiers
    prompt = list(range(100, 111))  # two full blocks can hit, the last token is recomputed
    stored = []
    for i, h in enumerate(hash_block_chain(prompt, BS)):
        block = torch.full((1, 2, 1, BS, 2), float(i + 1))
        tiers.store.put(tiers.key(h), encode_block(prompt[i * BS : (i + 1) * BS], io.to_bytes(block), io.layout))
        stored.append(block)
    a, b = req("a", range(3)), req("b", prompt)  # a is shorter than a block: no lookup of its own
    sched.add_request(a)
    run_step(sched)
    sched.add_request(b)
    for _ in range(3):  # b's blocks are still on their way: a decodes alone, b waits
        out = run_step(sched)
        assert [s.request.request_id for s in out.scheduled] == ["a"]
    gate.set()
    kv._lower_hits["b"][1].result(10)
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert b.num_cached_tokens == 2 * BS
    table = kv.block_ids(b)
    for i, block in enumerate(stored):
        assert torch.equal(kv_tensor[:, :, :, table[i]], block)  # loaded into the pool before b's prefill
    tiers.close()


def test_a_prefix_being_computed_is_waited_for_not_recomputed():
    """Requests arriving together with one prompt prefix: the first computes it, the others wait for its blocks
    and reuse them (each shared KV block computed once); an unrelated request behind them is not held up."""
    sched, kv = make(num_blocks=64, budget=40)
    a, b = req("a", list(range(30)) + [100]), req("b", list(range(30)) + [200])
    c = req("c", range(500, 509))
    for r in (a, b, c):
        sched.add_request(r)
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a", "c"]  # b waits for a's blocks; c goes on
    assert b.status == RequestStatus.WAITING
    out = run_step(sched)
    sb = [s for s in out.scheduled if s.request is b][0]
    assert b.num_cached_tokens == 28 and sb.num_new_tokens == 3  # 7 of a's blocks, shared
    assert kv.block_ids(a)[:7] == kv.block_ids(b)[:7]
    assert a.num_prompt_tokens_computed + b.num_prompt_tokens_computed == 31 + 3


def test_a_waiting_request_runs_when_the_request_computing_its_prefix_goes_away():
    sched, _ = make(num_blocks=64, budget=8)
    a, b = req("a", range(40)), req("b", list(range(40)) + [1])
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # a computes 8 tokens; b waits for a's third block
    assert b.status == RequestStatus.WAITING
    sched.finish_request(a, RequestStatus.FINISHED_ABORTED)
    run_step(sched)
    assert b.status == RequestStatus.RUNNING and b.num_cached_tokens == 8  # what a published before it went
    for _ in range(20):
        run_step(sched)
    assert b.num_output_tokens > 0
