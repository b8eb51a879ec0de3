"""--speculative through the HTTP server: the same text streamed and whole as a server without it, the per-
request opt-out, the Prometheus counters, and the acceptance rate in `kvserve bench`'s report."""

from __future__ import annotations

import asyncio
import json

from kvserve.bench.client import ClientConfig, run_requests
from kvserve.bench.report import format_table, summarize
from kvserve.bench.server_metrics import scrape, summarize_server
from kvserve.bench.workloads import BenchRequest
from tests.server.conftest import MODEL

PROMPT = "The alphabet: a b c d e f g h i j k l m n o p q r s t u v w x y z. Again: a b c d e f g"
BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 1}


def _streamed(http, body: dict) -> tuple[str, list[float]]:
    text, logprobs = [], []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                logprobs += choice["logprobs"]["token_logprobs"]
    return "".join(text), logprobs


def test_speculative_server_answers_as_a_plain_one(server_factory):
    plain = server_factory(speculative=None)
    spec = server_factory(speculative="ngram:4")
    with plain.client() as p, spec.client() as s:
        reference = p.post("/v1/completions", json=BODY).json()["choices"][0]
        whole = s.post("/v1/completions", json=BODY).json()["choices"][0]
        assert whole["text"] == reference["text"]
        assert whole["logprobs"]["token_logprobs"] == reference["logprobs"]["token_logprobs"]
        text, logprobs = _streamed(s, BODY)
        assert text == reference["text"] and logprobs == reference["logprobs"]["token_logprobs"]
        m = spec.metrics()
        drafts, accepted = m["kvserve:spec_decode_draft_tokens_total"], m["kvserve:spec_decode_accepted_tokens_total"]
        assert 0 < accepted <= drafts
        per_pos = [v for k, v in m.items() if k.startswith("kvserve:spec_decode_accepted_tokens_per_pos_total")]
        assert len(per_pos) == 4 and sum(per_pos) == accepted
        opted_out = s.post("/v1/completions", json={**BODY, "speculative": False}).json()["choices"][0]
        assert opted_out["text"] == reference["text"]
        assert spec.metrics()["kvserve:spec_decode_draft_tokens_total"] == drafts  # it drafted nothing
    assert "kvserve:spec_decode_draft_tokens_total" not in plain.metrics()
    spec.wait_idle()


def test_bench_reports_the_acceptance_rate(server_factory):
    spec = server_factory(speculative="ngram:4")
    cfg = ClientConfig(base_url=spec.base_url, model=MODEL, max_tokens=24, concurrency=2, ignore_eos=True)
    requests = [BenchRequest(prompt=PROMPT) for _ in range(3)]

    async def run():
        before = await scrape(spec.base_url)
        result = await run_requests(requests, cfg)
        return before, result, await scrape(spec.base_url)

    before, result, after = asyncio.run(run())
    server = summarize_server(before, after)
    sd = server["spec_decode"]
    m = spec.metrics()
    assert sd["draft_tokens"] == m["kvserve:spec_decode_draft_tokens_total"] > 0  # the only traffic it saw
    assert sd["acceptance_rate"] == sd["accepted_tokens"] / sd["draft_tokens"]
    summary = summarize(result, workload="copy", model=MODEL)
    summary["server"] = server
    assert f"acceptance rate {100 * sd['acceptance_rate']:.1f}%" in format_table(summary)
