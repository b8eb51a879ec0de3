"""Disaggregated prefill on a real Ray Serve fleet (1 prefill + 1 decode replica, loopback): the prefill
replica computes a prompt's KV into the shared KV store, the decode replica loads it as a prefix hit and goes
on; greedy tokens and their logprobs equal a single engine's, bit for bit."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.server.app import ServerOptions
from tests.fleet.test_fleet import ENGINE, HEADERS, _free_port, _wait_healthy

ray = pytest.importorskip("ray")
launch = pytest.importorskip("kvserve.fleet.launch")
httpx = pytest.importorskip("httpx")

DOC = "Prefill runs on one replica and decoding on another; the KV travels through the store. " * 10


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    server = ServerOptions(port=port, api_key=HEADERS["Authorization"].split()[1], threads=1)
    options = launch.FleetOptions.disaggregated("1:1")
    store = tmp_path_factory.mktemp("kv-store")
    launch.start_ray(options, server)
    try:
        config = EngineConfig(**ENGINE, kv_store=f"disk:{store}")
        state = launch.deploy(config, server, options)  # noqa: F841 - keeps the state actor alive
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=120)
        _wait_healthy(client, 1)
        yield client
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def test_disaggregated_greedy_tokens_and_logprobs_equal_a_single_engine(fleet, ours):
    prompts = [DOC + "First question?", DOC + "Second question?", "Short prompt"]
    single = LLM(loaded=ours, **{k: v for k, v in ENGINE.items() if k != "model"})
    want = single.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True))
    for prompt, ref in zip(prompts, want):
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0, "ignore_eos": True}
        r = fleet.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == ref.outputs[0].text
        assert choice["logprobs"]["token_logprobs"] == ref.outputs[0].logprobs
        if len(ref.prompt_token_ids) >= 32:  # the decode replica read the prompt's full blocks from the store
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == 16 * ((len(ref.prompt_token_ids) - 1) // 16)
