"""The forward pass on the other families a Hugging Face folder may hold, against transformers' own.

Tiny random-weight Qwen2, Mistral and Llama models (RoPE scaling llama3 and yarn, head_dim unlike
hidden / heads) saved by transformers and loaded by kvserve: greedy tokens must equal transformers'
generate in float32. Weights are scaled up so the next-token distributions are peaked (no near-ties).
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
}  # fmt: skip
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765, 10946, 17711",
]


def _save(cls, config, tokenizer_dir, out):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
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


def test_sliding_window_caps_the_context_and_stays_exact(tmp_path, hf_tokenizer_dir, hf_tokenizer, caplog):
    """Sliding-window attention is not implemented: the context is capped at the window, where it equals full
    attention, so whatever fits is exact and a longer prompt is refused naming the limit."""
    config = transformers.MistralConfig(**COMMON, rope_theta=1e6, sliding_window=24)
    model = _save(transformers.MistralForCausalLM, config, hf_tokenizer_dir, tmp_path)
    with caplog.at_level("WARNING"):
        llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64)
    assert llm.engine.max_model_len == 24 and "sliding-window" in caplog.text
    prompt = "The capital of France is"
    ids = hf_tokenizer.encode(prompt)
    n = 24 - len(ids)  # fill the window exactly
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert got == ref[0, len(ids) :].tolist()
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(PROMPTS[2], SamplingParams(max_tokens=1))
    qwen = transformers.Qwen2Config(**COMMON, sliding_window=24, use_sliding_window=False)  # window off: no cap
    _save(transformers.Qwen2ForCausalLM, qwen, hf_tokenizer_dir, tmp_path / "qwen2")
    assert LLM(model=str(tmp_path / "qwen2"), dtype="float32", num_kv_blocks=64).engine.max_model_len == 512


def test_unsupported_activation_is_refused(tmp_path, hf_tokenizer_dir):
    config = transformers.LlamaConfig(**COMMON, hidden_act="gelu")
    _save(transformers.LlamaForCausalLM, config, hf_tokenizer_dir, tmp_path)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64)
