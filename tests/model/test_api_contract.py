"""The offline API where vLLM users have expectations: prompt forms (vLLM's prompt dicts, tuples, arrays),
min_tokens (EOS and stop tokens are not sampled before it, checked against transformers' min_new_tokens),
the text of a stop token (left out unless include_stop_str_in_output), and the first output token's text
decoded after the prompt (SentencePiece decoders strip a leading space at the start of a text)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models

from kvserve import LLM, SamplingParams
from kvserve.detokenizer import DetokenizerState, add_token
from kvserve.model.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def llm(ours):
    return LLM(loaded=ours, dtype="float32", num_kv_blocks=64)


def test_prompt_forms(llm):
    ids = llm.tokenizer.encode("Hello there")
    want = llm.generate("Hello there", GREEDY)[0].outputs[0].token_ids
    forms = [
        {"prompt": "Hello there"},
        {"prompt_token_ids": ids},
        tuple(ids),
        np.array(ids),
        [np.int64(i) for i in ids],
    ]
    for form in forms:
        assert [o.outputs[0].token_ids for o in llm.generate(form, GREEDY)] == [want], type(form)
    assert [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": ids}, "Hello there"], GREEDY)] == [
        want,
        want,
    ]
    for bad, kind in [({"text": "x"}, ValueError), ([{"prompt": 3}], ValueError), (None, TypeError), (3.5, TypeError)]:
        with pytest.raises(kind):
            llm.generate(bad, GREEDY)
    assert llm.engine.pool.num_used_blocks == 0


def test_a_string_prompt_is_tokenized_once_even_with_n(llm, monkeypatch):
    calls = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, *a, **k: calls.append(text) or encode(text, *a, **k))
    want = llm.generate({"prompt_token_ids": encode("Hello there")}, GREEDY)[0]
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=4, n=3))[0]
    assert calls == ["Hello there"]
    assert out.prompt == "Hello there" and out.prompt_token_ids == want.prompt_token_ids
    assert [c.token_ids for c in out.outputs] == [want.outputs[0].token_ids] * 3


def test_min_tokens_keeps_eos_from_being_sampled_like_transformers(llm, hf_model):
    """transformers' min_new_tokens masks EOS until then; kvserve's min_tokens must give the same tokens."""
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Reply with just the word: hi"}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert free.token_ids[-1] == 2 and len(free.token_ids) < 17  # without min_tokens it stops early on EOS
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=20, min_tokens=17))[0].outputs[0]
    ref = hf_model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=20,
        min_new_tokens=17,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=2,
    )[0, len(ids) :].tolist()
    ref = ref[: ref.index(2) + 1] if 2 in ref else ref
    assert out.token_ids == ref and 2 not in out.token_ids[:17]


def test_min_tokens_also_holds_back_stop_token_ids(llm):
    ids = llm.tokenizer.encode("The capital of France is")
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[30]))[0].outputs[0]
    assert free.token_ids[-1] == 30  # "." ends it early
    held = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[30]))
    assert len(held[0].outputs[0].token_ids) == 6 and 30 not in held[0].outputs[0].token_ids


def test_stop_token_text_is_left_out_unless_asked_for(llm):
    p = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[198])  # "\n"
    out = llm.generate("The capital of France is", p)[0].outputs[0]
    assert out.token_ids[-1] == 198 and out.stop_reason == 198
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1]) and not out.text.endswith("\n")
    p = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[198], include_stop_str_in_output=True)
    assert llm.generate("The capital of France is", p)[0].outputs[0].text == out.text + "\n"


def test_first_output_token_keeps_its_leading_space_with_a_sentencepiece_decoder():
    """Llama-2 / Mistral tokenizer.json decoders replace "▁" by a space, then strip one leading space: decoding
    an output token alone would drop the space that separates it from the prompt."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁there": 3, "!": 4}
    backend = FastTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = Tokenizer(backend, bos_token_id=None, eos_token_ids=[0])
    prompt, output = [1], [2, 3, 4]
    state = DetokenizerState.after_prompt(prompt)
    text = "".join(add_token(tok, state, t) for t in output)
    full, head = tok.decode(prompt + output), tok.decode(prompt)
    assert (full, head) == ("Hello world there!", "Hello")
    assert text == state.text == full[len(head) :] == " world there!"


def test_a_pool_smaller_than_the_context_is_warned_about(ours, caplog):
    with caplog.at_level("WARNING"):
        small = LLM(loaded=ours, dtype="float32", num_kv_blocks=8)  # 128 tokens against a 8,192-token context
    assert any("less than max_model_len 8192" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="tokens of KV"):
        small.generate("Hello", SamplingParams(max_tokens=None))  # could need the whole context: refused
    assert small.generate("Hello", SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
