"""/metrics of a server on a tiny hybrid (Bamba) model: recomputed prompt tokens per request, checkpoint counters
and the current placement, after requests that share a prefix. Every expected value is derived by hand from the
placement rules (README, placement.py's docstring) and cross-checked against each response's `usage`.

Also: a plain (attention-only) model observes the recomputed-tokens histogram too and exposes no placement.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvserve.config import EngineConfig
from kvserve.server.app import build_app
from tests.hybrid_models import bamba_config, save_with_tokenizer
from tests.server.conftest import RunningServer

BS = 8  # block size
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_bamba(tmp_path_factory, hf_tokenizer_dir):
    """A 2-layer random Bamba (one attention, one Mamba-2 layer) saved as an HF folder with a tokenizer."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(bamba_config(vocab_size=VOCAB, num_hidden_layers=2))
    return save_with_tokenizer(model, hf_tokenizer_dir, tmp_path_factory.mktemp("tiny_bamba"))


def _serve(path, policy: str) -> RunningServer:
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        device="cpu",
        block_size=BS,
        num_kv_blocks=64,
        max_num_seqs=4,
        checkpoint_policy=policy,
        seed=0,
    )
    return RunningServer(build_app(config))


def _complete(srv: RunningServer, prompt: list[int]) -> dict:
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": srv.engine.config.model, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return {"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def test_hybrid_metrics_after_shared_prefix_requests(tiny_bamba):
    rng = random.Random(0)
    root = [rng.randrange(3, VOCAB) for _ in range(6 * BS + 3)]  # 51 tokens, 6 full blocks
    a = root
    b = root[: 5 * BS] + [101, 102]  # shares 5 blocks with a
    c = root[: 5 * BS] + [103, 104]  # shares 5 blocks with a and b
    srv = _serve(tiny_bamba, "optimal:2")
    try:
        m = srv.metrics()
        assert m['kvserve:recurrent_checkpoint_placement_info{block_size="8",depths="",policy="optimal:2"}'] == 1
        # a: cold, observes depth 0: nothing learned, so its 2 checkpoints go on the spare grid of a 6-block
        #    prompt (6 // 4 <= 2): a snapshots at depth 4.
        # b: KV hit of 5 blocks, observed -> depth 5 placed (one depth fits the budget) plus the grid's depth 4;
        #    b resumes from a's checkpoint at 4 (32 tokens), recomputes 10 and snapshots at depth 5.
        # c: KV hit 5 -> resumes from b's checkpoint at depth 5 = 40 tokens; recomputes 2.
        usages = [_complete(srv, p) for p in (a, b, c)]
        assert [u["prompt"] for u in usages] == [51, 42, 42]
        assert [u["cached"] for u in usages] == [0, 32, 40]
        m = srv.metrics()
        info = {k: v for k, v in m.items() if k.startswith("kvserve:recurrent_checkpoint_placement_info")}
        name = 'kvserve:recurrent_checkpoint_placement_info{block_size="8",depths="4,5",policy="optimal:2"}'
        assert info == {name: 1}
        assert m["kvserve:recurrent_checkpoint_placement_changes_total"] == 1
        assert m["kvserve:recomputed_prompt_tokens_count"] == 3
        assert m["kvserve:recomputed_prompt_tokens_sum"] == 51 + 10 + 2
        assert m["kvserve:recomputed_prompt_tokens_sum"] == sum(u["prompt"] - u["cached"] for u in usages)
        assert m['kvserve:recomputed_prompt_tokens_bucket{le="0.0"}'] == 0
        assert m['kvserve:recomputed_prompt_tokens_bucket{le="16.0"}'] == 2  # b and c
        assert m['kvserve:recomputed_prompt_tokens_bucket{le="32.0"}'] == 2
        assert m['kvserve:recomputed_prompt_tokens_bucket{le="64.0"}'] == 3  # a
        assert m["kvserve:recurrent_checkpoints_stored_total"] == 2
        assert m["kvserve:recurrent_checkpoint_hits_total"] == 2  # b and c
        assert m["kvserve:recurrent_checkpoint_misses_total"] == 0
        assert m["kvserve:recurrent_checkpoints_evicted_total"] == 0
        assert m["kvserve:recurrent_resumed_tokens_total"] == 32 + 40
        assert m["kvserve:recurrent_checkpoint_bytes"] > 0
    finally:
        srv.stop()


def test_fixed_rule_placement_has_no_depths(tiny_bamba):
    """every-block:2 snapshots at blocks 2, 4, 6 of a 51-token prompt; a request sharing 5 blocks resumes at 4."""
    rng = random.Random(1)
    root = [rng.randrange(3, VOCAB) for _ in range(6 * BS + 3)]
    srv = _serve(tiny_bamba, "every-block:2")
    try:
        usages = [_complete(srv, root), _complete(srv, root[: 5 * BS] + [7, 9])]
        assert [u["cached"] for u in usages] == [0, 4 * BS]
        m = srv.metrics()
        assert m['kvserve:recurrent_checkpoint_placement_info{block_size="8",depths="",policy="every-block:2"}'] == 1
        assert m["kvserve:recurrent_checkpoint_placement_changes_total"] == 0
        assert m["kvserve:recurrent_checkpoints_stored_total"] == 3
        assert m["kvserve:recomputed_prompt_tokens_sum"] == 51 + (42 - 32)
        assert m["kvserve:recomputed_prompt_tokens_count"] == 2
    finally:
        srv.stop()


def test_no_checkpoints_still_exports_the_counters_at_zero(tiny_bamba):
    """Policy none: the counters are there (0), so dashboards see no gap, and the placement says none."""
    srv = _serve(tiny_bamba, "none")
    try:
        rng = random.Random(2)
        _complete(srv, [rng.randrange(3, VOCAB) for _ in range(3 * BS)])
        m = srv.metrics()
        for name in ("checkpoints_stored", "checkpoint_hits", "checkpoint_misses", "checkpoints_evicted"):
            assert m[f"kvserve:recurrent_{name}_total"] == 0
        assert m["kvserve:recurrent_checkpoint_bytes"] == 0
        assert any(k.startswith("kvserve:recurrent_checkpoint_placement_info") and 'policy="none"' in k for k in m)
    finally:
        srv.stop()


def test_attention_model_observes_recomputed_tokens_without_placement(server_factory):
    srv = server_factory()
    doc = "The pool keeps every full block of sixteen tokens, addressed by a hash chain over its tokens. " * 4
    usages = []
    for q in ("Q1", "Q2"):
        with srv.client() as c:
            r = c.post("/v1/completions", json={"model": "smollm2-135m", "prompt": doc + q, "max_tokens": 2})
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        usages.append(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"])
    assert usages[1] < usages[0]  # the second one reused the document's blocks
    m = srv.metrics()
    assert m["kvserve:recomputed_prompt_tokens_count"] == 2
    assert m["kvserve:recomputed_prompt_tokens_sum"] == sum(usages)
    assert not any("placement" in k or "recurrent" in k for k in m)
    srv.stop()
