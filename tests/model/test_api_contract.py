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
from tests.conftest import transformers_greedy

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
    assert llm.engine.get_stats().num_used_blocks == 0


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


class _BruteForceAdjust:
    """OpenAI's logit_bias and frequency/presence penalties written out token by token, as a transformers
    logits processor (an independent reference for kvserve's vectorised version)."""

    def __init__(self, prompt_len: int, bias: dict[int, float], frequency: float = 0.0, presence: float = 0.0):
        self.prompt_len, self.bias, self.frequency, self.presence = prompt_len, bias, frequency, presence

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        if self.bias:
            for token, b in self.bias.items():
                scores[0, token] += b
        if self.frequency or self.presence:
            counts: dict[int, int] = {}
            for token in input_ids[0, self.prompt_len :].tolist():
                counts[token] = counts.get(token, 0) + 1
            for token, c in counts.items():
                scores[0, token] -= self.frequency * c + self.presence
        return scores


def test_penalties_and_logit_bias_match_transformers(llm, hf_model):
    """repetition_penalty against transformers' own processor; logit_bias and frequency/presence penalties
    against a token-by-token version; all four together in vLLM's order. Greedy, float32, token for token."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    ids = llm.tokenizer.encode("List the days of the week: Monday, Tuesday,")
    n = 24
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids
    bias = {plain[0]: -5.0, plain[3]: -3.0, 28: 2.5}  # push the plain choices away, pull another token in
    cases = [
        (dict(repetition_penalty=1.5), [RepetitionPenaltyLogitsProcessor(1.5)]),
        (dict(repetition_penalty=0.8), [RepetitionPenaltyLogitsProcessor(0.8)]),
        (dict(logit_bias=bias), [_BruteForceAdjust(len(ids), bias)]),
        (dict(frequency_penalty=1.2, presence_penalty=0.7), [_BruteForceAdjust(len(ids), {}, 1.2, 0.7)]),
        (dict(presence_penalty=-1.5), [_BruteForceAdjust(len(ids), {}, 0.0, -1.5)]),
        (
            dict(logit_bias=bias, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5),
            [
                _BruteForceAdjust(len(ids), bias),
                RepetitionPenaltyLogitsProcessor(1.3),
                _BruteForceAdjust(len(ids), {}, 0.5, 0.5),
            ],
        ),
    ]
    for kwargs, processors in cases:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0, **kwargs)
        out = llm.generate([ids], params)[0].outputs[0]
        expected = transformers_greedy(hf_model, ids, n, logits_processor=LogitsProcessorList(processors))
        assert out.token_ids == expected, kwargs
        if kwargs != {"repetition_penalty": 0.8}:  # (a penalty below 1 favours the repeats greedy makes anyway)
            assert out.token_ids != plain, kwargs  # the case changes the output, so the comparison means something
    # logprobs stay the raw model's (vLLM's default): the first token's equals the plain run's for the same token
    raw = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    biased = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5, logit_bias={28: 100}))
    first = biased[0].outputs[0]
    assert first.token_ids == [28] and first.top_logprobs[0] == raw.top_logprobs[0]
    assert llm.engine.get_stats().num_used_blocks == 0


def test_penalised_sampling_does_not_depend_on_the_batch(llm):
    """A seeded request with penalties samples the same tokens alone and next to others."""
    ids = llm.tokenizer.encode("Write a list of fruits:")
    params = SamplingParams(
        temperature=0.9, seed=5, max_tokens=16, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.2
    )
    alone = llm.generate([ids], params)[0].outputs[0].token_ids
    others = [llm.tokenizer.encode(t) for t in ("Hello", "Tell me a story about a cat", "1, 2, 3,")]
    batched = llm.generate(
        [others[0], ids, others[1], others[2]],
        [SamplingParams(max_tokens=12, seed=1)]
        + [params]
        + [SamplingParams(temperature=0, max_tokens=9, presence_penalty=1.0)] * 2,
    )
    assert batched[1].outputs[0].token_ids == alone
    plain = llm.generate([ids], SamplingParams(temperature=0.9, seed=5, max_tokens=16, ignore_eos=True))
    assert plain[0].outputs[0].token_ids != alone


def test_bad_penalties_and_logit_bias_are_refused(llm):
    for kwargs in (
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(logit_bias={"a": 1}),
        dict(logit_bias={1: 200}),
        dict(logit_bias={1.5: 1}),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="logit_bias token id"):
        llm.generate("Hi", SamplingParams(logit_bias={10**7: 1.0}))
    assert llm.engine.get_stats().num_used_blocks == 0


def test_prompt_logprobs_match_transformers(ours, hf_model):
    """prompt_logprobs (vLLM's): each prompt token's logprob given the ones before it, and the top-k, equal
    log_softmax of transformers' logits; also in small chunks, next to other requests, and when the prompt is
    already in the prefix cache (such a request recomputes it: cached positions have no logits)."""
    llm = LLM(loaded=ours, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=20)  # chunks of <= 20
    text = "The quick brown fox jumps over the lazy dog. Then the dog wakes up and chases the fox around the yard."
    ids = llm.tokenizer.encode(text + " The fox hides in a hollow log until the dog gives up and goes home.")
    assert len(ids) >= 40
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [ref[j - 1, ids[j]].item() for j in range(1, len(ids))]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for outs in (
        llm.generate([ids], params),  # cold
        llm.generate([ids, "Hello", ids[:20]], [params, SamplingParams(max_tokens=3), params])[::2],  # warm, batched
    ):
        out = outs[0]
        assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(ids) == len(out.prompt_top_logprobs)
        np.testing.assert_allclose(out.prompt_logprobs[1:], want, atol=2e-4, rtol=0)
        for j in (1, 17, len(ids) - 1):
            top = out.prompt_top_logprobs[j]
            values, top_ids = torch.topk(ref[j - 1], 3)
            assert list(top) == top_ids.tolist()
            np.testing.assert_allclose(list(top.values()), values.tolist(), atol=2e-4, rtol=0)
    short = outs[1]
    assert len(short.prompt_logprobs) == 20
    np.testing.assert_allclose(short.prompt_logprobs[1:], want[:19], atol=2e-4, rtol=0)
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0  # others still hit the cache
    assert llm.engine.get_stats().num_used_blocks == 0
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([ids], SamplingParams(prompt_logprobs=10**6))


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


def test_step_outputs_are_deltas_that_never_take_text_back(llm):
    """LLMEngine.step() returns what each step added. With stop strings the engine holds back what could start
    one, so the deltas joined are exactly the free-running text cut at the first stop string (none of it sent
    and later taken back), and each delta's tokens are that step's alone."""
    prompt = "Once upon a time"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = free.text
    engine = llm.engine
    for stop in (text[10:13], text[5:6], text[-7:-2], "not in the text"):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=0)
        rid = engine.add_request(prompt, params)
        deltas = []
        while engine.has_unfinished_requests():
            deltas += [out.outputs[0] for out in engine.step() if out.request_id == rid]
        cut = text.find(stop)
        assert "".join(d.text for d in deltas) == (text if cut < 0 else text[:cut]), stop
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == free.token_ids[: len(ids)] and all(len(d.token_ids) == len(d.logprobs) for d in deltas)
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        assert deltas[-1].finish_reason == ("length" if cut < 0 else "stop")
    assert engine.get_stats().num_used_blocks == 0
