"""The forward pass on the other families a Hugging Face folder may hold, against transformers' own.

Tiny random-weight Qwen2, Qwen3, Mistral, Llama (RoPE scaling llama3 and yarn, head_dim unlike
hidden / heads), Gemma 2, Gemma 3 and Phi-3 models saved by transformers and loaded by kvserve: greedy tokens
must equal transformers' generate in float32 (eager attention, so its sliding windows and soft-capping apply).
Weights are scaled up so the next-token distributions are peaked (no near-ties); the new families' norm
weights get noise too (Gemma's start at zero, Qwen3's q/k norms at one: equal weights would hide a swap).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams

COMMON = dict(
    vocab_size=49152,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
FAMILIES = {
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON, rope_theta=1e6,
                                                                      tie_word_embeddings=True)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**COMMON, rope_theta=1e6,
                                                                            sliding_window=None)),
    "llama-llama3-head-dim": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(**COMMON, head_dim=64, tie_word_embeddings=False, rope_scaling=LLAMA3),
    ),
    "llama-yarn": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(
            **COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        ),
    ),
    "qwen3-head-dim": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**COMMON, head_dim=64, rope_theta=1e6,
                                                                               tie_word_embeddings=True)),
    "qwen3-bias": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**COMMON, attention_bias=True)),
    # layer 0 has a 16-token window, layer 1 full attention; caps low enough to bend the scores and logits
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**COMMON, head_dim=32, sliding_window=16,
                                                                         query_pre_attn_scalar=24,
                                                                         attn_logit_softcapping=2.0,
                                                                         final_logit_softcapping=10.0)),
    "gemma3": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig(
            **COMMON, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        ),
    ),
    "phi3-partial-rotary": (transformers.Phi3ForCausalLM, transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5,
                                                                                  pad_token_id=0)),
}  # fmt: skip
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765, 10946, 17711",
]


NOISY_NORMS = ("qwen3", "gemma2", "gemma3_text", "phi3")


def _save(cls, config, tokenizer_dir, out):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4)
            if config.model_type in NOISY_NORMS and "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_transformers(family, tmp_path, hf_tokenizer_dir, hf_tokenizer):
    cls, config = FAMILIES[family]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([hf_tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
        assert got == ref[0, ids.shape[1] :].tolist(), (family, prompt)
    assert llm.engine.get_stats().num_used_blocks == 0


def test_unsupported_activation_is_refused(tmp_path, hf_tokenizer_dir):
    config = transformers.LlamaConfig(**COMMON, hidden_act="gelu")
    _save(transformers.LlamaForCausalLM, config, hf_tokenizer_dir, tmp_path)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64)


def _reference(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


# ~300 tokens: windows of 24 / 32 keys skip whole KEY_CHUNKs (128) of it
LONG = "Count with me: " + ", ".join(str(i) for i in range(100, 190))
WINDOWED = {
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**COMMON, sliding_window=24)),
    "qwen2-window-on-layer-1": (  # Qwen2 windows the layers from max_window_layers on
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=32, max_window_layers=1),
    ),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config(**COMMON, sliding_window=24, pad_token_id=0)),
}


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sliding_window_matches_transformers(family, tmp_path, hf_tokenizer_dir, hf_tokenizer):
    """A real window over the paged KV: prompts far longer than the window, prefilled in chunks that cross it and
    decoded in one batch, give transformers' tokens; the attention kernel (no window) is not chosen."""
    cls, config = WINDOWED[family]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=128, max_num_batched_tokens=64)
    assert llm.engine.max_model_len == 512 and not llm.engine.backends.native_attention
    prompts = [LONG, PROMPTS[2], LONG[:90]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == [_reference(model, hf_tokenizer.encode(p), 16) for p in prompts]


def _watch_held(llm) -> list[int]:
    """Blocks each running request holds after every step (invariants checked each step)."""
    kv, held, step = llm.engine._parts.kv, [], llm.engine.step

    def watched():
        out = step()
        held.extend(kv.num_held(r) for r in llm.engine._parts.scheduler.running)
        kv.check_invariants()
        return out

    llm.engine.step = watched
    return held


@pytest.mark.parametrize("caching", [True, False])
def test_blocks_below_every_window_are_given_back(caching, tmp_path, hf_tokenizer_dir, hf_tokenizer):
    """Mistral windows every layer (24 keys): a request holds only the blocks its window still reaches, so
    prompts of up to 450 tokens run three at a time in a 20-block pool (320 tokens) and give transformers'
    tokens."""
    cls, config = WINDOWED["mistral"]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(
        model=str(tmp_path), dtype="float32", num_kv_blocks=20, max_num_batched_tokens=32,
        enable_prefix_caching=caching,
    )  # fmt: skip
    assert llm.engine._parts.kv.window == 24
    held = _watch_held(llm)
    prompts = [LONG, LONG[:200], PROMPTS[2]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    refs = [_reference(model, hf_tokenizer.encode(p), 16) for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == refs
    # a request's blocks: the window (24) + a chunk (32) + two partly filled blocks, never its whole prompt
    assert held and max(held) <= (24 + 32) // 16 + 2
    assert llm.engine.get_stats().num_used_blocks == 0


def test_window_prefix_hit_takes_only_the_window(tmp_path, hf_tokenizer_dir, hf_tokenizer):
    """A cached long prompt asked again: the hit covers it, but the request takes only the blocks its window
    reaches; same tokens as transformers."""
    cls, config = WINDOWED["mistral"]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = _reference(model, hf_tokenizer.encode(LONG), 8)
    assert llm.generate([LONG], params)[0].outputs[0].token_ids == ref
    held = _watch_held(llm)
    again = llm.generate([LONG], params)[0]
    assert again.outputs[0].token_ids == ref
    assert again.num_cached_tokens >= 400
    assert held and max(held) <= (24 + 32) // 16 + 2
    assert llm.engine.get_stats().num_used_blocks == 0


def test_window_as_long_as_the_context_keeps_the_kernel(tmp_path, hf_tokenizer_dir):
    """A window no shorter than max_model_len hides no key: the attention kernel stays (where it builds)."""
    from kvserve.model import native

    _save(transformers.MistralForCausalLM, WINDOWED["mistral"][1], hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, max_model_len=24)
    kernel = native.kernel_attention_available(torch.device("cpu"), torch.float32)
    assert llm.engine.backends.native_attention == kernel
    with pytest.raises(ValueError, match="sliding-window attention"):
        LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, attention_backend="native")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_prefix_cache_and_batch_are_exact(dtype, tmp_path, hf_tokenizer_dir, hf_tokenizer):
    """Gemma 3 (windowed and global layers): the same long prompt twice with prefix caching on, the second served
    from cached blocks, and both inside a batch give the same tokens as the prompt alone (and, in float32,
    as transformers)."""
    cls, config = FAMILIES["gemma3"]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype=dtype, num_kv_blocks=128, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate(LONG, params)[0]
    second = llm.generate(LONG, params)[0]
    assert second.num_cached_tokens > 0 and second.outputs[0].token_ids == first.outputs[0].token_ids
    batched = llm.generate([PROMPTS[0], LONG, PROMPTS[2]], params)
    assert batched[1].outputs[0].token_ids == first.outputs[0].token_ids
    if dtype == "float32":
        assert first.outputs[0].token_ids == _reference(model, hf_tokenizer.encode(LONG), 12)


def test_unsupported_families_and_rope_are_refused(tmp_path, hf_tokenizer_dir):
    """Phi-3's longrope and multimodal Gemma 3 are refused, naming what is not supported."""
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
            "original_max_position_embeddings": 256}  # fmt: skip
    config = transformers.Phi3Config(**COMMON, rope_parameters=rope)
    _save(transformers.Phi3ForCausalLM, config, hf_tokenizer_dir, tmp_path)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'longrope'"):
        LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64)
    from kvserve.model.config import ModelConfig

    with pytest.raises(ValueError, match="unsupported model architecture 'gemma3'"):
        ModelConfig.from_hf_config({"model_type": "gemma3", "text_config": {}})


def test_gemma2_logprobs_follow_the_capped_logits(tmp_path, hf_tokenizer_dir, hf_tokenizer):
    """Final soft-capping leaves the argmax alone (tanh is monotonic): the logprobs show it is applied."""
    cls, config = FAMILIES["gemma2"]
    model = _save(cls, config, hf_tokenizer_dir, tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0)
    out = llm.generate(PROMPTS[0], params)[0].outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([hf_tokenizer.encode(PROMPTS[0])])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[out.token_ids[0]].item()
    assert out.logprobs[0] == pytest.approx(expected, abs=2e-4)
