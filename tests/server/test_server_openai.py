"""The server through the official `openai` client: sync and async, streaming and not, chat and completions."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest

from kvserve.llm import LLM
from kvserve.sampling_params import SamplingParams

from .conftest import API_KEY, ENGINE_DEFAULTS, MODEL

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def aclient(server):
    """A factory: an AsyncOpenAI client is bound to the event loop it first runs in, so make one per asyncio.run."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(ours) -> LLM:
    """The offline API over the same weights and engine settings: what the server must reproduce."""
    return LLM(loaded=ours, **ENGINE_DEFAULTS)


def test_chat_sync(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens in range(0, u.prompt_tokens, 16)  # whole blocks, never the last


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_greedy_matches_offline_llm(client, aclient, reference):
    """Server output, sent concurrently (so batched), equals LLM.generate / LLM.chat for the same prompts."""
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].text for o in reference.generate(PROMPTS, params)]

    async def all_prompts():
        async with aclient() as ac:
            calls = [ac.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0) for p in PROMPTS]
            return await asyncio.gather(*calls)

    got = [r.choices[0].text for r in asyncio.run(all_prompts())]
    assert got == expected
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    want = reference.chat(messages, params)[0].outputs[0].text
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want


def test_penalties_and_logit_bias_match_offline_llm(client, reference):
    """OpenAI's presence/frequency penalties and logit_bias (keys are token id strings), and vLLM's
    repetition_penalty, reach the sampler: the server's text equals LLM.generate with the same settings."""
    prompt = "List the days of the week: Monday, Tuesday,"
    bias = {reference.tokenizer.encode(" Wednesday")[0]: -100.0}
    adjust = dict(presence_penalty=0.6, frequency_penalty=0.9, repetition_penalty=1.3, logit_bias=bias)
    want = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=16, **adjust))[0].outputs[0].text
    plain = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert want != plain and "Wednesday" in plain and "Wednesday" not in want
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        presence_penalty=0.6,
        frequency_penalty=0.9,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"repetition_penalty": 1.3},
    )
    assert r.choices[0].text == want
    messages = [{"role": "user", "content": "Name three colours."}]
    params = SamplingParams(temperature=0, max_tokens=12, frequency_penalty=1.5, logit_bias=bias)
    want = reference.chat(messages, params)[0].outputs[0].text
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        frequency_penalty=1.5,
        logit_bias={str(k): v for k, v in bias.items()},
    )
    assert r.choices[0].message.content == want


def test_chat_stream_async_with_usage(aclient):
    async def run():
        async with aclient() as ac:
            return await _collect(ac)

    async def _collect(ac):
        stream = await ac.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content and len(finals) == 1
    assert chunks[-1].usage.completion_tokens <= 10 and chunks[-1].usage.total_tokens > 10
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_n_choices_seeded_and_reproducible(aclient):
    async def run():
        kwargs = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=7)
        async with aclient() as ac:
            return await asyncio.gather(ac.completions.create(**kwargs), ac.completions.create(**kwargs))

    a, b = asyncio.run(run())
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 24  # counted over the three choices
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_n_choices_stream_indexed(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, seed=1, stream=True
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_prompt_forms_and_choice_order(client, server):
    tok = server.engine.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text  # prompt 0, samples 0 and 1
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode(PROMPTS[1]))
    batch_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in batch_ids.choices] == [by_text.choices[0].text] * 2


def test_stop_string_same_in_stream(client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0).choices[0].text
    stop = base.strip()[3:6]
    assert stop and stop in base
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    whole = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert whole.finish_reason == "stop" and stop not in whole.text
    assert base.startswith(whole.text) and streamed == whole.text


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 2 and max(top.values()) == x for x, top in zip(lp.token_logprobs, lp.top_logprobs))  # greedy
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = c.choices[0].logprobs.content
    assert 0 < len(content) <= 4 and all(len(t.top_logprobs) == 3 for t in content)


def test_logprob_bytes_rebuild_the_text(client):
    """Tokens that are only part of a UTF-8 character show as U+FFFD, but their `bytes` are the raw ones:
    joined, they are the generated text, as OpenAI's field promises."""
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat exactly: こんにちは、世界 ✓"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    content = c.choices[0].logprobs.content
    assert bytes(b for t in content for b in t.bytes).decode("utf-8") == c.choices[0].message.content


def test_cached_tokens_and_cache_salt(client):
    """A long shared system prompt hits the prefix cache on the second request; another salt does not."""
    system = f"Session {uuid.uuid4().hex}. " + "You are a careful assistant who answers in one short sentence. " * 6
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the sky's color?"}]

    def cached(**extra) -> tuple[int, int]:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0, **extra)
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens

    first, prompt_tokens = cached()
    assert prompt_tokens > 64 and first == 0
    second, _ = cached()
    assert second >= 32 and second % 16 == 0 and second < prompt_tokens
    assert cached(extra_body={"cache_salt": "tenant-b"})[0] == 0
    assert cached(extra_body={"cache_salt": "tenant-b"})[0] >= 32


def test_models_health_version_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    with server.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/version").json()["version"]
        paths = http.get("/openapi.json").json()["paths"]
        assert "requestBody" in paths["/v1/chat/completions"]["post"]
    m = server.metrics()
    assert m["kvserve:generation_tokens_total"] > 0 and m["kvserve:prompt_tokens_total"] > 0
    assert m["kvserve:prefix_cache_queries_total"] >= m["kvserve:prefix_cache_hits_total"] > 0
    assert m["kvserve:time_to_first_token_seconds_count"] > 0
    assert m["kvserve:e2e_request_latency_seconds_count"] > 0
    assert m["kvserve:time_per_output_token_seconds_count"] > 0
    assert m['kvserve:request_success_total{finished_reason="length"}'] > 0
    for name in ("kvserve:num_preemptions_total", "kvserve:kv_blocks_evicted_total"):
        assert name in m
    assert m["kvserve:batch_retries_total"] == 0  # every step so far ran as one batch


def test_echo_puts_the_scored_prompt_in_front(client, server, reference):
    """Legacy completions' echo (as lm-eval-harness uses it to score text): the prompt's text and tokens come
    first, with logprobs each prompt token's logprob given the ones before it (the first None), equal to the
    offline API's prompt_logprobs; streamed the same; without logprobs only the text is prepended."""
    prompt = "The capital of France is Paris. The capital of Italy is"
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2))[0]
    ids = ref.prompt_token_ids
    tok = reference.tokenizer
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    (choice,) = r.choices
    assert choice.text == prompt + ref.outputs[0].text
    lp = choice.logprobs
    assert lp.tokens[: len(ids)] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(ref.prompt_logprobs[1:], abs=1e-6)
    assert lp.token_logprobs[len(ids) :] == pytest.approx(ref.outputs[0].logprobs, abs=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)
    top = lp.top_logprobs[5]
    want = {tok.decode([t], skip_special_tokens=False): v for t, v in ref.prompt_top_logprobs[5].items()}
    assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=1e-6)
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # scoring the prompt recomputes it
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    plain = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(tok.decode(ids, skip_special_tokens=False))
    assert plain.choices[1].text.startswith(tok.decode(ids[:5], skip_special_tokens=False))
    assert plain.choices[0].logprobs is None


def test_tokenize_and_detokenize_like_vllm(server, reference):
    """vLLM's /tokenize (a prompt, or messages through the chat template) and /detokenize round trip."""
    tok = reference.tokenizer
    with server.client() as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there, world", "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode("Hello there, world") and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == reference.engine.max_model_len
        assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
        messages = [{"role": "user", "content": "What is 2 + 2?"}]
        body = http.post("/tokenize", json={"messages": messages}).json()
        chat = reference.chat(messages, SamplingParams(max_tokens=1))[0]
        assert body["tokens"] == chat.prompt_token_ids  # exactly what a chat completion feeds the engine
        assert body["token_strs"] is None
        r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
        assert r.status_code == 200 and r.json()["prompt"] == tok.decode(body["tokens"], skip_special_tokens=False)
        assert "What is 2 + 2?" in r.json()["prompt"]


def test_served_model_name(server_factory):
    srv = server_factory(served_model_name="house-model")
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["house-model"]
    r = client.completions.create(model="house-model", prompt="Hi", max_tokens=2)
    assert r.model == "house-model"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).model == "house-model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="Hi", max_tokens=1)
    srv.stop()
