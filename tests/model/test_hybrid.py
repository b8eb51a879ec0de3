"""Hybrid (Bamba: attention + Mamba-2) and recurrent (Mamba2ForCausalLM) models against transformers.

Tiny random-weight checkpoints are built with transformers' own classes, saved as HF folders (with the
SmolLM2 tokenizer files) and loaded by kvserve. Asserted:
* greedy tokens equal transformers' generate (float32, pure-torch path), alone and batched; the top-5
  logprobs at every generated position equal log_softmax of transformers' logits (to 1e-4);
* chunked prefill (tiny token budget, chunks cut mid-SSD-window) and preemption (tiny KV pool, with and
  without resuming from checkpoints) give the same tokens, and the state slots and KV blocks all come back;
* recurrent-state checkpoints: with every placement policy, prompts sharing prefixes of random lengths give
  the no-cache (and transformers') tokens, and resumes happen at every checkpoint depth with
  num_cached_tokens == that depth in tokens (also with the KV coming back from the host-RAM tier);
* in bfloat16, greedy and seeded top-p sampling: resuming from checkpoints gives the no-cache tokens;
* a step that fails after the forward commits no state (the per-request retry gives the same tokens).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.model import load_model
from kvserve.server.metrics import ServerMetrics
from tests.hybrid_models import bamba_config, save_with_tokenizer

BS = 8  # block size: small so that short prompts span several blocks
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
VOCAB = 512


def _transformers():
    import transformers

    return transformers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bamba(tmp_path_factory, hf_tokenizer_dir):
    """4 layers, attention at layer 1; SSD chunk 16, so prefill chunks cut through SSD windows."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = bamba_config(vocab_size=VOCAB, initializer_range=0.25)  # peaked logits: greedy choices far from ties
    model = tf.BambaForCausalLM(cfg).eval()
    return model, save_with_tokenizer(model, hf_tokenizer_dir, tmp_path_factory.mktemp("bamba"))


@pytest.fixture(scope="module")
def mamba2(tmp_path_factory, hf_tokenizer_dir):
    tf = _transformers()
    torch.manual_seed(1)
    cfg = tf.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_heads=8,
        head_dim=16,
        state_size=16,
        expand=2,
        n_groups=2,
        chunk_size=16,
        initializer_range=0.25,
        tie_word_embeddings=False,
    )
    model = tf.Mamba2ForCausalLM(cfg).eval()
    return model, save_with_tokenizer(model, hf_tokenizer_dir, tmp_path_factory.mktemp("mamba2"))


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


PROMPTS = _prompts(0, [5, 17, 33, 50, 71])


def _hf_greedy(model, prompts: list[list[int]], max_tokens: int = GREEDY.max_tokens) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


_LOADED: dict[Path, object] = {}


def _llm(path: Path, **kwargs) -> LLM:
    """An engine on the HF folder at path (loaded from disk once per module, then shared)."""
    if path not in _LOADED:
        _LOADED[path] = load_model(str(path))
    args = {"dtype": "float32", "block_size": BS, "num_kv_blocks": 128, "max_num_seqs": 8} | kwargs
    return LLM(model=str(path), loaded=_LOADED[path], **args)


def _released(llm: LLM, batch_retries: int = 0) -> None:
    engine = llm.engine
    assert engine.get_stats().num_failed_batches == batch_retries  # no batch fell back to one request at a time
    assert engine.get_stats().num_used_blocks == 0
    pool = engine._recurrent.pool
    pool.check_invariants()
    assert pool.num_free_slots == pool.num_slots


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_greedy_and_logprobs_match_transformers(which, request):
    model, path = request.getfixturevalue(which)
    reference = _hf_greedy(model, PROMPTS)
    llm = _llm(path)
    assert llm.engine.model_config.is_hybrid
    top5 = SamplingParams(temperature=0, max_tokens=GREEDY.max_tokens, ignore_eos=True, logprobs=5)
    single = [llm.generate(p, top5)[0] for p in PROMPTS]
    batched = llm.generate(PROMPTS, GREEDY)
    assert _tokens(single) == reference
    assert _tokens(batched) == reference
    # the top-5 logprobs at every generated position == transformers' full-sequence forward
    for prompt, out in zip(PROMPTS[:3], single[:3]):
        ids = prompt + out.outputs[0].token_ids
        with torch.inference_mode():
            ref = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
        for i, top in enumerate(out.outputs[0].top_logprobs):
            row = ref[len(prompt) - 1 + i]
            assert set(top) == set(torch.topk(row, 5).indices.tolist())
            torch.testing.assert_close(torch.tensor(list(top.values())), row[list(top)], atol=1e-4, rtol=0)
    _released(llm)


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_chunked_prefill_and_preemption_change_nothing(which, request):
    _, path = request.getfixturevalue(which)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    reference = _llm(path, enable_prefix_caching=False).generate(PROMPTS, params)
    chunked = _llm(path, max_num_batched_tokens=7)
    assert _tokens(chunked.generate(PROMPTS, params)) == _tokens(reference)
    _released(chunked)
    small = _llm(path, num_kv_blocks=16)  # 128 tokens for 5 requests of up to 95
    outs = small.generate(PROMPTS, params)
    assert small.engine.get_stats().num_preemptions > 0
    assert _tokens(outs) == _tokens(reference)
    for a, b in zip(outs, reference):
        torch.testing.assert_close(a.outputs[0].logprobs, b.outputs[0].logprobs, atol=1e-4, rtol=0)
    small.engine.check_invariants()
    _released(small)
    # preempted requests resume from their own checkpoints when their KV blocks are still cached
    resuming = _llm(path, num_kv_blocks=16, checkpoint_policy="every-block:2")
    outs = resuming.generate(PROMPTS, params)
    assert resuming.engine.get_stats().num_preemptions > 0
    assert resuming.engine.get_stats().checkpoints.resumed_tokens > 0
    assert _tokens(outs) == _tokens(reference)
    _released(resuming)


def _shared_prefix_prompts(seed: int, n: int) -> list[list[int]]:
    """n prompts in a few families, each member sharing a random-length prefix with its family's root."""
    rng = random.Random(seed)
    roots = _prompts(seed, [80, 64])
    out = []
    for _ in range(n):
        root = rng.choice(roots)
        keep = rng.randrange(0, len(root) + 1)
        out.append(root[:keep] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 12))])
    return out


POLICIES = ["none", "every-block:1", "every-block:3", "sqrt", "log", "balanced:3", "optimal:3"]


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_checkpoint_policies_give_no_cache_outputs(which, request):
    model, path = request.getfixturevalue(which)
    prompts = _shared_prefix_prompts(7, 12)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference = _tokens(_llm(path, enable_prefix_caching=False).generate(prompts, params))
    assert reference == _hf_greedy(model, prompts, params.max_tokens)
    for policy in POLICIES:
        llm = _llm(path, checkpoint_policy=policy, max_num_batched_tokens=40)
        outs = [llm.generate(p, params)[0] for p in prompts]  # one at a time: later ones hit earlier ones
        assert _tokens(outs) == reference, policy
        store = llm.engine._recurrent.store
        cached = [o.num_cached_tokens for o in outs]
        if policy == "none":
            assert store is None and cached == [0] * len(prompts)
        else:
            store.check_invariants()
            assert store.num_stored > 0 and store.num_hits > 0  # every policy resumes some requests here
            assert sum(cached) > 0 and all(c % BS == 0 for c in cached)
        _released(llm)


def test_a_tight_checkpoint_store_evicts_and_stays_exact(bamba):
    """A store with room for about three snapshots: every policy evicts (LRU), resumes from what is left, and
    gives the no-cache tokens; the store's books balance and no KV block leaks."""
    _, path = bamba
    prompts = _shared_prefix_prompts(11, 16)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reference = _tokens(_llm(path, enable_prefix_caching=False).generate(prompts, params))
    probe = _llm(path, checkpoint_policy="every-block:1")
    probe.generate(prompts[0], params)
    store = probe.engine._recurrent.store
    snapshot = store.bytes_held // len(store)
    for policy in POLICIES[1:]:
        llm = _llm(path, checkpoint_policy=policy, checkpoint_memory=int(snapshot * 3.5), max_num_batched_tokens=40)
        outs = [llm.generate(p, params)[0] for p in prompts]
        assert _tokens(outs) == reference, policy
        store = llm.engine._recurrent.store
        store.check_invariants()
        assert len(store) <= 3 and store.bytes_held <= int(snapshot * 3.5), policy
        assert store.num_evicted > 0 and store.num_hits > 0, policy
        _released(llm)


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_resume_at_every_checkpoint_depth(which, request):
    _, path = request.getfixturevalue(which)
    root = _prompts(3, [6 * BS + 3])[0]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    depths = list(range(1, len(root) // BS + 1))  # every-block:1 snapshots at every block: resume at each
    branches = [root[: d * BS] + [VOCAB - 1 - d, 7, 9] for d in depths]
    reference = _llm(path, enable_prefix_caching=False).generate(branches, params)
    llm = _llm(path, checkpoint_policy="every-block:1")
    llm.generate(root, params)
    store = llm.engine._recurrent.store
    assert store.num_stored == len(root) // BS  # a snapshot at every block boundary of the prompt
    for d, prompt, ref in zip(depths, branches, reference):
        out = llm.generate(prompt, params)[0]
        assert out.num_cached_tokens == d * BS
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        torch.testing.assert_close(out.outputs[0].logprobs, ref.outputs[0].logprobs, atol=1e-4, rtol=0)
    metrics = ServerMetrics()
    metrics.set_snapshot(llm.engine.get_stats())
    text = metrics.render().decode()
    assert f"kvserve:recurrent_checkpoint_hits_total {float(len(depths))}" in text
    assert f"kvserve:recurrent_resumed_tokens_total {float(sum(depths) * BS)}" in text
    # a deeper KV hit without a checkpoint there resumes from the deepest one below it
    sparse = _llm(path, checkpoint_policy="every-block:4")
    sparse.generate(root, params)
    out = sparse.generate(root[: 5 * BS] + [11, 12], params)[0]
    assert out.num_cached_tokens == 4 * BS
    ref = _llm(path, enable_prefix_caching=False).generate(root[: 5 * BS] + [11, 12], params)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    _released(llm)
    _released(sparse)


def test_failed_batch_is_retried_from_unchanged_states(bamba, monkeypatch):
    """A step that fails after the forward (here: in sampling) must not commit the new states: the engine's
    one-request-at-a-time retry starts from the states before the step."""
    import kvserve.model.runner as runner_module

    _, path = bamba
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = _tokens(_llm(path, enable_prefix_caching=False).generate(PROMPTS, params))
    llm = _llm(path, max_num_batched_tokens=40)
    real = runner_module.sample
    state = {"calls": 0, "failures": 0}

    def flaky(logits, params, *args):
        state["calls"] += 1
        if state["calls"] > 1 and state["failures"] < 2 and len(params) > 1:
            state["failures"] += 1
            raise RuntimeError("injected failure after the forward")
        return real(logits, params, *args)

    monkeypatch.setattr(runner_module, "sample", flaky)
    outs = llm.generate(PROMPTS, params)
    assert state["failures"] == 2
    assert [o.error for o in outs] == [None] * len(PROMPTS)
    assert _tokens(outs) == reference
    _released(llm, batch_retries=2)


def test_resume_with_kv_blocks_loaded_from_the_host_tier(bamba):
    """KV hit partly from the host-RAM tier (evicted pool blocks), recurrent state from a checkpoint."""
    _, path = bamba
    root = _prompts(5, [5 * BS + 2])[0]
    branch = root[: 4 * BS] + [3, 4, 5]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reference = _llm(path, enable_prefix_caching=False).generate(branch, params)[0]
    llm = _llm(path, checkpoint_policy="every-block:2", num_kv_blocks=12, cpu_offload_gb=0.01)
    llm.generate(root, params)
    llm.generate(_prompts(6, [80])[0], params)  # 11 of the 12 blocks: evicts root's blocks to host RAM
    out = llm.generate(branch, params)[0]
    assert llm.engine.get_stats().tiers["cpu"].hits > 0
    assert out.num_cached_tokens == 4 * BS
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    _released(llm)


def test_checkpoint_flags_reach_the_engine_config():
    from kvserve.cli import build_parser, engine_config
    from kvserve.config import EngineConfig

    args = build_parser().parse_args(
        ["generate", "hi", "--checkpoint-policy", "optimal:4", "--checkpoint-memory", "64MiB",
         "--checkpoint-resolve-every", "8", "--checkpoint-decay", "0.9", "--checkpoint-switch-margin", "0"]
    )  # fmt: skip
    config = engine_config(args)
    assert config.checkpoint_policy == "optimal:4" and config.checkpoint_memory == 64 << 20
    policy = config.placement_policy()
    assert (policy.resolve_every, policy.histogram.decay, policy.switch_margin) == (8, 0.9, 0.0)
    with pytest.raises(ValueError, match="checkpoint policy"):
        EngineConfig(checkpoint_policy="every-block")
    for bad in ({"checkpoint_resolve_every": 0}, {"checkpoint_decay": 0.0}, {"checkpoint_switch_margin": 1.0}):
        for policy_spec in ("optimal:2", "none"):
            with pytest.raises(ValueError, match="resolve_every|decay|switch_margin"):
                EngineConfig(checkpoint_policy=policy_spec, **bad)


def test_checkpoint_store_budget_and_policy_as_configured(bamba, caplog):
    """Default budget: a quarter of --kv-cache-memory (also when --num-kv-blocks sizes the pool);
    --checkpoint-memory overrides it; prefix caching off means no store and policy none (as /metrics says);
    a budget below one snapshot is warned about."""
    _, path = bamba
    llm = _llm(path, checkpoint_policy="every-block:2", kv_cache_memory=256 << 20)  # and num_kv_blocks=128
    assert llm.engine.get_stats().checkpoints.budget_bytes == (256 << 20) // 4
    llm = _llm(path, checkpoint_policy="every-block:2", num_kv_blocks=None, kv_cache_memory=64 << 20)
    assert llm.engine.get_stats().checkpoints.budget_bytes == (64 << 20) // 4
    llm = _llm(path, checkpoint_policy="every-block:2", checkpoint_memory=12345)
    assert llm.engine.get_stats().checkpoints.budget_bytes == 12345
    llm = _llm(path, checkpoint_policy="every-block:2", enable_prefix_caching=False)
    assert llm.engine._recurrent.store is None and llm.engine._recurrent.policy.spec == "none"
    with caplog.at_level("WARNING"):
        _llm(path, checkpoint_policy="every-block:2", checkpoint_memory=10)
    assert any("less than one snapshot" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_bfloat16_runs_chunked_with_checkpoints(which, request):
    """Smoke test of the bf16 path (conv state bf16, SSM state float32): no dtype errors, everything released."""
    _, path = request.getfixturevalue(which)
    llm = _llm(path, dtype="bfloat16", checkpoint_policy="every-block:2", max_num_batched_tokens=24)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(PROMPTS, params) + llm.generate(PROMPTS[-1][:40] + [5, 6], params)
    assert all(len(t) == 4 for t in _tokens(outs))
    assert outs[-1].num_cached_tokens == 32  # KV hit 5 blocks, deepest checkpoint (every 2 blocks) at 4
    _released(llm)


@pytest.mark.parametrize("which", ["bamba", "mamba2"])
def test_bfloat16_and_sampling_give_the_no_cache_tokens(which, request):
    """bf16, greedy and seeded top-p sampling: resuming from checkpoints (one at a time and batched, chunk budgets
    that cut SSD windows) gives the tokens of the same prompts run with caching off. Not bitwise (README,
    Exactness): the test models' logits are peaked, so rounding does not flip a choice."""
    _, path = request.getfixturevalue(which)
    prompts = _shared_prefix_prompts(11, 12)
    for params in (
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True),
    ):
        plain = _llm(path, dtype="bfloat16", enable_prefix_caching=False)
        reference = _tokens([plain.generate(p, params)[0] for p in prompts])
        for policy, budget in (("every-block:1", 40), ("optimal:3", 13)):
            llm = _llm(path, dtype="bfloat16", checkpoint_policy=policy, max_num_batched_tokens=budget)
            one = [llm.generate(p, params)[0] for p in prompts]
            assert _tokens(one) == reference, (policy, params.temperature)
            assert _tokens(llm.generate(prompts, params)) == reference, (policy, params.temperature)
            assert llm.engine.get_stats().checkpoints.resumed_tokens > 0
            _released(llm)


def test_prompt_logprobs_on_a_hybrid_model(bamba):
    """prompt_logprobs equal log_softmax of transformers' logits; the scoring request still stores its
    checkpoints (a later prompt resumes from them) and is not observed as an overlap depth of 0."""
    model, path = bamba
    ids = PROMPTS[-1]
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [ref[j - 1, ids[j]].item() for j in range(1, len(ids))]
    llm = _llm(path, checkpoint_policy="every-block:1", max_num_batched_tokens=13)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), torch.tensor(want), atol=1e-4, rtol=0)
    store = llm.engine._recurrent.store
    assert store.num_stored == (len(ids) - 1) // BS  # a snapshot at every full block of the prompt, the first too
    later = llm.generate([ids[:20] + [7, 8, 9]], SamplingParams(temperature=0, max_tokens=2))[0]
    assert later.num_cached_tokens == 16
    _released(llm)
    opt = _llm(path, checkpoint_policy="optimal:2")
    opt.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert opt.engine.get_stats().placement.num_observed == 0
    _released(opt)


def test_recurrent_state_slots_count_against_the_kv_budget(bamba):
    """--kv-cache-memory bounds the KV blocks and the per-sequence state slots together."""
    _, path = bamba
    budget = 4 << 20
    llm = _llm(path, num_kv_blocks=None, kv_cache_memory=budget, max_num_seqs=8)
    engine = llm.engine
    slots = engine._recurrent.pool
    slot_bytes = slots.conv.nbytes + slots.ssm.nbytes  # what the pool really allocated
    kv_bytes = engine._runner.kv_cache.nbytes
    assert 0 < slot_bytes and kv_bytes + slot_bytes <= budget
    assert budget - (kv_bytes + slot_bytes) < kv_bytes // engine.get_stats().num_blocks  # less than one more block left
    more_seqs = _llm(path, num_kv_blocks=None, kv_cache_memory=budget, max_num_seqs=16).engine
    assert more_seqs.get_stats().num_blocks < engine.get_stats().num_blocks  # twice the slots leave fewer blocks
    with pytest.raises(ValueError, match="max_num_seqs"):
        _llm(path, num_kv_blocks=None, kv_cache_memory=slot_bytes - 1, max_num_seqs=8)


def test_optimal_places_per_prompt_length_and_keeps_what_shorter_prompts_use(bamba):
    """optimal:1 learns depth 2, then depth 6 dominates: prompts of 6+ blocks snapshot at 6, shorter ones
    still at 2 (the DP on the depths below their length), so the depth-2 snapshots stay useful and stay."""
    _, path = bamba
    llm = _llm(path, checkpoint_policy="optimal:1")
    rec = llm.engine._recurrent
    rng = random.Random(7)
    base = [rng.randrange(3, VOCAB) for _ in range(6 * BS)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def ask(shared: int, tail: int = 2 * BS) -> int:
        return llm.generate(base[:shared] + [rng.randrange(3, VOCAB) for _ in range(tail)], params)[0].num_cached_tokens

    for _ in range(4):
        ask(2 * BS)  # overlap depth 2 blocks
    assert rec.policy.placed == [2]
    assert 2 in {rec.store.depth_of(k) for k in rec.store.lru_order()}
    for _ in range(6):
        ask(6 * BS)  # now depth 6 carries the mass: the placement moves there (re-solved at observation 8)
    assert rec.policy.placed == [6] and rec.policy.checkpoint_depths(5) == [2]
    assert {2, 6} <= {rec.store.depth_of(k) for k in rec.store.lru_order()}
    assert ask(2 * BS, tail=BS) == 2 * BS  # a 3-block prompt resumes from depth 2
    assert ask(6 * BS) == 6 * BS
    rec.store.check_invariants()
    _released(llm)


def test_checkpoint_hits_count_admissions_not_lookups(bamba):
    """A request with a checkpoint under its prefix that waits for KV memory is looked up every step; the
    hit counter counts it once, when it is admitted (kvserve:recurrent_checkpoint_hits_total)."""
    _, path = bamba
    rng = random.Random(0)
    root = [rng.randrange(3, VOCAB) for _ in range(6 * BS)]
    others = [[rng.randrange(3, VOCAB) for _ in range(13)] for _ in range(5)]
    late = root[: 5 * BS] + [rng.randrange(3, VOCAB) for _ in range(12)]
    llm = _llm(path, num_kv_blocks=16, max_num_seqs=8, checkpoint_policy="every-block:5")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate(root, params)
    rec = llm.engine._recurrent
    store = rec.store
    hits, misses, resumed = store.num_hits, store.num_misses, rec.num_resumed_tokens
    waits = 0
    real = rec.limit_prefix_hit

    def spy(request, computed):
        nonlocal waits
        waits += request.prompt_token_ids == late
        return real(request, computed)

    rec.limit_prefix_hit = spy
    outs = llm.generate(others + [late], params)
    assert waits > 1  # it did wait for memory, looked up more than once
    assert outs[-1].num_cached_tokens == 5 * BS and rec.num_resumed_tokens - resumed == 5 * BS
    assert store.num_hits - hits == 1 and store.num_misses == misses
    _released(llm)


def test_mamba2_bfloat16_keeps_the_residual_in_float32_like_transformers(mamba2, hf_tokenizer_dir, tmp_path):
    """transformers' Mamba2Block keeps the residual stream in float32 (residual_in_fp32, on by default) while
    norms and mixers run in bf16. kvserve reads the flag and does the same: its bf16 logprobs are then closer
    to transformers' (default) bf16 ones than with a bf16 residual."""
    import copy

    model, _ = mamba2
    assert model.config.residual_in_fp32
    reference = copy.deepcopy(model).to(torch.bfloat16)
    top5 = SamplingParams(temperature=0, max_tokens=1, logprobs=5)

    def distance(flag: bool) -> float:
        variant = copy.deepcopy(model)
        variant.config.residual_in_fp32 = flag
        path = save_with_tokenizer(variant, hf_tokenizer_dir, tmp_path / str(flag))
        llm = LLM(model=str(path), dtype="bfloat16", enable_prefix_caching=False, block_size=BS, num_kv_blocks=64)
        assert llm.engine.model_config.residual_in_fp32 is flag
        gaps = []
        for prompt in PROMPTS:
            out = llm.generate(prompt, top5)[0].outputs[0]
            with torch.inference_mode():
                ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1].float(), -1)
            gaps += [abs(lp - ref[tok].item()) for tok, lp in out.top_logprobs[0].items()]
        return sum(gaps) / len(gaps)

    fp32_residual, bf16_residual = distance(True), distance(False)
    assert fp32_residual < 0.02
    assert fp32_residual < bf16_residual


def test_speculative_decoding_is_refused_for_recurrent_models(bamba):
    """A rejected draft would leave its mark in the recurrent state, which cannot be rolled back."""
    _, path = bamba
    with pytest.raises(ValueError, match="speculative decoding needs an attention-only model"):
        _llm(path, speculative="ngram:2")
