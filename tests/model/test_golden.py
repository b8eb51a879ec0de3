"""The engine against an independent reference (transformers on the same GGUF weights), and against itself.

* greedy tokens equal transformers', one request at a time and all batched together;
* prefix-cache hits, chunked prefill, batching and preemption change nothing: the chosen tokens AND their
  logprobs are bit-identical to a run with no cache (batch invariance, in float32 and bfloat16).
"""

from __future__ import annotations

import pytest
import torch

from bench.golden_inputs import DOC, PROMPTS
from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, logprobs=0)


@pytest.fixture(scope="module")
def hf_reference(hf_model, ours) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time, no padding."""
    refs = []
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GREEDY.max_tokens,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )
        refs.append(out[0, len(ids) :].tolist())
    return refs


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _logprobs(outs):
    return [o.outputs[0].logprobs for o in outs]


@pytest.mark.parametrize("caching", [False, True])
def test_greedy_matches_transformers_one_at_a_time_and_batched(ours, hf_reference, caching):
    llm = LLM(loaded=ours, dtype="float32", enable_prefix_caching=caching, num_kv_blocks=256)
    reference = hf_reference
    single = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    batched = llm.generate(PROMPTS, GREEDY)
    assert _tokens(single) == reference
    assert _tokens(batched) == reference
    assert _logprobs(batched) == _logprobs(single)  # bitwise: batching changes nothing
    assert llm.engine.get_stats().num_failed_batches == 0  # ... and it ran as a batch, not retried one by one
    assert llm.engine.get_stats().num_used_blocks == 0


def test_logprobs_match_transformers(ours, hf_model):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=64)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    ids = ours.tokenizer.encode(PROMPTS[0]) + out.token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    n = len(ours.tokenizer.encode(PROMPTS[0]))
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[n - 1 + i, tok].item(), abs=1e-4)
        assert set(out.top_logprobs[i]) == set(torch.topk(ref[n - 1 + i], 3).indices.tolist())


@pytest.mark.parametrize(("dtype", "path"), [("float32", "native"), ("bfloat16", "native"), ("bfloat16", "torch")])
def test_prefix_cache_hit_changes_nothing(ours, dtype, path, attention_path):
    attention_path(path)
    questions = [
        "\nQ: What does the pool evict first?\nA:",
        "\nQ: When is a block never evicted?\nA:",
        "\nQ: How long is a block?\nA:",
    ]
    prompts = [DOC + q for q in questions]
    cold = LLM(loaded=ours, dtype=dtype, enable_prefix_caching=False, num_kv_blocks=256)
    reference = cold.generate(prompts, GREEDY)
    warm = LLM(loaded=ours, dtype=dtype, enable_prefix_caching=True, num_kv_blocks=256)
    first = warm.generate(prompts[0], GREEDY)[0]
    assert first.num_cached_tokens == 0
    tok = ours.tokenizer
    for prompt, ref in zip(prompts[1:], reference[1:]):
        out = warm.generate(prompt, GREEDY)[0]
        a, b = tok.encode(prompts[0]), tok.encode(prompt)
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert out.num_cached_tokens == common // 16 * 16 > 100  # exactly the shared full blocks
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].logprobs == ref.outputs[0].logprobs  # bitwise
    # an identical prompt hits all full blocks but the last token, and still matches
    again = warm.generate(prompts[0], GREEDY)[0]
    n = len(tok.encode(prompts[0]))
    assert again.num_cached_tokens == (n - 1) // 16 * 16
    assert again.outputs[0].logprobs == reference[0].outputs[0].logprobs


@pytest.mark.parametrize(("dtype", "path"), [("float32", "native"), ("bfloat16", "native"), ("float32", "torch")])
def test_chunked_prefill_and_batching_are_bitwise_invariant(ours, dtype, path, attention_path):
    attention_path(path)
    prompts = [DOC + f"\nQ: Say something about block {i}.\nA:" for i in range(3)] + PROMPTS[:3]
    lone = LLM(loaded=ours, dtype=dtype, enable_prefix_caching=False, num_kv_blocks=256)
    reference = [lone.generate(p, GREEDY)[0] for p in prompts]
    llm = LLM(loaded=ours, dtype=dtype, enable_prefix_caching=True, max_num_batched_tokens=37, num_kv_blocks=256)
    chunked = llm.generate(prompts, GREEDY)
    assert _tokens(chunked) == _tokens(reference)
    assert _logprobs(chunked) == _logprobs(reference)
    assert llm.engine.get_stats().num_failed_batches == 0


def test_preemption_outputs_equal_unconstrained_run(ours):
    prompts = [p + " " + p for p in PROMPTS[:6]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    reference = LLM(loaded=ours, dtype="float32", num_kv_blocks=256).generate(prompts, params)
    small = LLM(loaded=ours, dtype="float32", num_kv_blocks=14)  # 224 tokens for ~6 x 70
    outs = small.generate(prompts, params)
    assert small.engine.get_stats().num_preemptions > 0
    assert small.engine.get_stats().num_failed_batches == 0
    assert _tokens(outs) == _tokens(reference)
    assert _logprobs(outs) == _logprobs(reference)
    small.engine.check_invariants()
    assert small.engine.get_stats().num_used_blocks == 0


def test_hf_folder_generates_like_the_gguf(ours, hf_dir):
    a = LLM(loaded=ours, dtype="float32", num_kv_blocks=64).generate(PROMPTS[:2], GREEDY)
    b = LLM(model=str(hf_dir), dtype="float32", num_kv_blocks=64).generate(PROMPTS[:2], GREEDY)
    assert _tokens(a) == _tokens(b)


def test_sampling_seed_is_reproducible_per_request(ours):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=128)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate(PROMPTS[3], p)[0].outputs[0].token_ids
    crowd = llm.generate([PROMPTS[0], PROMPTS[3], PROMPTS[5]], [GREEDY, p, SamplingParams(temperature=1.0)])
    assert crowd[1].outputs[0].token_ids == alone
    other = llm.generate(PROMPTS[3], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=16))[0]
    assert other.outputs[0].token_ids != alone
    greedy = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    topk1 = llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, top_k=1, seed=5, max_tokens=16))[0]
    assert topk1.outputs[0].token_ids == greedy
    n3 = llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=8))[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2]


def test_stop_strings_and_stop_tokens(ours):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=64)
    full = llm.generate(PROMPTS[5], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert full.text.startswith(" 16, 20, 29")  # the model's own continuation; 29 is our stop string
    out = llm.generate(PROMPTS[5], SamplingParams(temperature=0, max_tokens=20, stop=["29"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "29"
    assert out.text == " 16, 20, "
    out = llm.generate(
        PROMPTS[5], SamplingParams(temperature=0, max_tokens=20, stop=["29"], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert out.text == " 16, 20, 29"
    stop_tok = full.token_ids[2]
    out = llm.generate(PROMPTS[5], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert out.outputs[0].token_ids == full.token_ids[:3] and out.outputs[0].stop_reason == stop_tok
    eos = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] == 2 and "<|im_end|>" not in eos.text


def test_chat_prompts_are_transformers_chat_template(ours, hf_tokenizer):
    """llm.chat = generate on the token ids transformers' own apply_chat_template gives (one and a batch)."""
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=128)
    convs = [
        [{"role": "user", "content": "Name three rivers."}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
         {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And of Spain?"}],
    ]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = llm.chat(convs, params)
    assert llm.chat(convs[1], params)[0].outputs[0].token_ids == got[1].outputs[0].token_ids
    for conv, out in zip(convs, got):
        text = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == llm.generate([ids], params)[0].outputs[0].token_ids


def test_chat_takes_tools_tool_history_and_vllm_options_as_the_server_does(ours):
    """LLM.chat(tools=..., continue_final_message=...) renders exactly what the server's chat endpoint renders
    for the same body: tool signatures, the assistant's earlier call as <tool_call> text and the tool result
    as <tool_response> (the bundled template has no tool support: kvserve's default Hermes rendering)."""
    from kvserve.server.prompts import chat_text
    from kvserve.server.protocol import ChatMessage, ToolDef

    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=128)
    params = SamplingParams(temperature=0, max_tokens=4)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    conv = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
    ]
    out = llm.chat(conv, params, tools=[tool])[0]
    text = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    server = chat_text(
        [ChatMessage.model_validate(m) for m in conv], llm.tokenizer, tools=[ToolDef.model_validate(tool)]
    )
    assert text == server
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in text and text.endswith("<|im_start|>assistant\n")
    start = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "It is sunny and"}]
    cont = llm.chat(start, params, add_generation_prompt=False, continue_final_message=True)[0]
    assert llm.tokenizer.decode(cont.prompt_token_ids, skip_special_tokens=False).endswith("It is sunny and")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(start, params, continue_final_message=True)


def test_bad_input_raises_clear_errors_and_leaks_nothing(ours):
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=64, max_model_len=256)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("word " * 400, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="KV cache holds"):
        LLM(loaded=ours, dtype="float32", num_kv_blocks=4).generate("hello", SamplingParams(max_tokens=200))
    with pytest.raises(ValueError, match="unknown model"):
        LLM(model="/no/such/model")
    with pytest.raises(ValueError, match="unknown LLM option"):
        LLM(loaded=ours, block_sz=16)
    with pytest.raises(ValueError, match="block_size"):
        LLM(loaded=ours, block_size=12)
    for kwargs, knob in (({"block_size": "16"}, "block_size"), ({"enable_prefix_caching": "no"}, "enable_prefix"),
                         ({"device": "tpu"}, "device"), ({"max_model_len": 2.5}, "max_model_len")):  # fmt: skip
        with pytest.raises(ValueError, match=knob):
            LLM(loaded=ours, **kwargs)
    for kwargs, knob in (({"temperature": float("nan")}, "temperature"), ({"max_tokens": 2.5}, "max_tokens"),
                         ({"top_p": float("inf")}, "top_p"), ({"seed": "7"}, "seed")):  # fmt: skip
        with pytest.raises(ValueError, match=knob):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat([], GREEDY)
    with pytest.raises(ValueError, match="'content'"):
        llm.chat([{"role": "user"}], GREEDY)
    assert llm.engine.get_stats().num_used_blocks == 0 and not llm.engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids  # still serves


def test_block_size_changes_nothing(ours):
    """Blocks larger than an attention key chunk (256 > 128) and smaller ones give bit-identical results."""
    prompts = [DOC + "\nQ: Why hash chains?\nA:", PROMPTS[0]]
    runs = [
        LLM(loaded=ours, dtype="bfloat16", block_size=bs, num_kv_blocks=4096 // bs).generate(prompts, GREEDY)
        for bs in (8, 16, 256)
    ]
    assert _tokens(runs[0]) == _tokens(runs[1]) == _tokens(runs[2])
    assert _logprobs(runs[0]) == _logprobs(runs[1]) == _logprobs(runs[2])


@pytest.mark.parametrize(
    ("dtype", "block_size", "path"),
    [("float32", 16, "torch"), ("bfloat16", 16, "torch"), ("bfloat16", 256, "torch"), ("bfloat16", 16, "native")],
)
def test_decoding_over_shared_cached_prefixes_is_bitwise_invariant(ours, dtype, block_size, path, attention_path):
    """Sequences decoding over the same cached blocks: on the torch path they read those keys once, in one GEMM
    for all of them (attention's shared-chunk path, one group per prefix); on the kernel each reads them in
    place. Either way each row must get the bits it gets alone."""
    import kvserve.model.attention as attention

    monkeypatch = attention_path(path)

    shared_seen = []
    build = attention.build_group

    def spy(*args, **kwargs):
        group = build(*args, **kwargs)
        shared_seen.append(group.shared)
        return group

    monkeypatch.setattr("kvserve.model.runner.build_group", spy)
    prefixes = [DOC * 2, "Another document. " + DOC * 4]  # two families, interleaved in one batch
    prompts = [prefixes[i % 2] + f"\nQ: Question number {i}: what is kept in the pool?\nA:" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    alone = LLM(loaded=ours, dtype=dtype, enable_prefix_caching=False, num_kv_blocks=256)
    reference = [alone.generate(p, params)[0] for p in prompts]
    assert alone.engine.backends.native_attention == (path == "native")
    assert max(shared_seen, default=0) == 0  # one sequence at a time: nothing to share
    llm = LLM(loaded=ours, dtype=dtype, block_size=block_size, num_kv_blocks=4096 // block_size)
    llm.generate(prefixes, SamplingParams(temperature=0, max_tokens=1))  # both prefixes' blocks now cached
    shared_seen.clear()
    outs = llm.generate(prompts, params)
    lengths = [len(ours.tokenizer.encode(p)) // block_size * block_size // 128 * 128 for p in prefixes]
    if path == "torch":  # each family's decodes read its whole cached prefix as shared
        assert set(lengths) <= set(shared_seen)
    assert _tokens(outs) == _tokens(reference)
    assert _logprobs(outs) == _logprobs(reference)
    assert llm.engine.get_stats().num_failed_batches == 0  # no batch fell back to one request at a time
    assert llm.engine.get_stats().num_used_blocks == 0
