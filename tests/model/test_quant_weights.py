"""Quantized GGUF weights run as stored (weights="auto") give the bits of weights="dequantize".

weights="dequantize" dequantizes every GGUF tensor with gguf-py to float32 at load and casts it to the dtype;
weights="auto" keeps Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors in their stored form and dequantizes them inside
kvserve's linear kernel. The promise: the same tokens AND the same logprobs, bit for bit, in float32 and
bfloat16, one request at a time or batched, with prefix-cache hits or without, on the fused C layer (native
attention) and on the per-linear path (torch attention).

* random Llama GGUFs of every quantized type (tests/quant_models.py), K-quants and mixed types inside the fused
  q/k/v and gate/up among them: the stored values are gguf-py's dequantization, and auto == dequantize;
* the bundled SmolLM2 (Q4_1 layers, a Q8_0 embedding tied as lm_head) on the golden prompts;
* auto holds the quantized weights (markedly fewer bytes than the dequantized model); where the kernel does not
  run it falls back to dequantize; a bad choice is a clear error.

Without the float32 linear kernel (no AVX-512) weights="auto" is weights="dequantize": nothing to compare, so
the file skips there, naming what the CPU lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from bench.golden_inputs import PROMPTS as GOLDEN_PROMPTS
from kvserve import LLM, SamplingParams
from kvserve.model import load_model
from kvserve.model.gguf_weights import gguf_to_hf_name, unpermute_qk
from tests.conftest import SMOLLM, require_native_linear
from tests.quant_models import HEADS, KV_HEADS, PROMPTS, QUANT_MIXES, tensor_types, write_quant_llama_gguf

DTYPES = ("float32", "bfloat16")
# greedy, every step's chosen logprob and top 5, and each prompt token's logprob and top 1 (the prefill's
# logits at every position, not only the last); ignore_eos: every request runs all its steps
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=5, prompt_logprobs=1, ignore_eos=True)
CACHED = SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)  # prompt_logprobs skip the cache
BUNDLED = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _linear_kernel() -> None:
    """The whole file: weights="auto" only differs from "dequantize" where kvserve's linear kernel runs."""
    require_native_linear(torch.float32)


def _require_dtype(dtype: str) -> None:
    if dtype == "bfloat16":
        require_native_linear(torch.bfloat16)  # AVX512-BF16 as well


def _llm(model: str, weights: str, dtype: str, **kwargs) -> LLM:
    # linear_backend="native" whatever $KVSERVE_LINEAR says: auto's kernel path, and dequantize's on the same
    # kernel (oneDNN rounds differently)
    kwargs = {"linear_backend": "native", "num_kv_blocks": 64, "max_model_len": 512, **kwargs}
    return LLM(model, weights=weights, dtype=dtype, **kwargs)


def _results(outs) -> list[tuple]:
    """Everything a request returns that the weights decide: tokens, logprobs and top logprobs (generated and,
    when asked for, prompt): compared with ==, so float for float, bit for bit (0.0 == -0.0 aside)."""
    return [
        (
            o.outputs[0].token_ids,
            o.outputs[0].logprobs,
            o.outputs[0].top_logprobs,
            o.prompt_logprobs,
            o.prompt_top_logprobs,
        )
        for o in outs
    ]


def _assert_sane(outs, n_tokens: int) -> None:
    """Full-length outputs with finite logprobs (a NaN would make == fail for a reason == does not name)."""
    for o in outs:
        out = o.outputs[0]
        assert len(out.token_ids) == len(out.logprobs) == len(out.top_logprobs) == n_tokens
        assert np.isfinite(out.logprobs).all() and all(np.isfinite(list(t.values())).all() for t in out.top_logprobs)


@pytest.fixture(scope="session")
def mix_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_gguf")
    return {name: write_quant_llama_gguf(root / f"{name}.gguf", types) for name, types in QUANT_MIXES.items()}


# ----------------------------------------------------------------------------------------- the fixture files
@pytest.mark.parametrize("mix", QUANT_MIXES)
def test_fixture_stores_the_mix_and_loads_as_gguf_py_dequantizes(mix_paths, mix):
    """Each file holds the mix's tensor types, and today's loader (= weights="dequantize") gives gguf-py's
    dequantization of the stored blocks (q/k rows un-permuted): finite, not all equal."""
    path = mix_paths[mix]
    reader = GGUFReader(str(path))
    assert {t.name: t.tensor_type for t in reader.tensors} == tensor_types(QUANT_MIXES[mix])
    loaded = load_model(str(path))
    assert loaded.config.tie_word_embeddings == ("output" not in QUANT_MIXES[mix])
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        want = torch.from_numpy(np.ascontiguousarray(dequantize(np.array(tensor.data), tensor.tensor_type)))
        want = want.float().reshape(shape)
        if ".q_proj." in name or ".k_proj." in name:
            want = unpermute_qk(want, HEADS if ".q_proj." in name else KV_HEADS)
        got = loaded.weights[name]
        assert got.shape == shape and torch.equal(got.float(), want), tensor.name
        assert torch.isfinite(want).all() and want.std() > 0, tensor.name


# ----------------------------------------------------------------------------- random quantized Llamas
@pytest.fixture(
    scope="module",
    params=[(m, d, a) for m in QUANT_MIXES for d in DTYPES for a in ("native", "torch")],
    ids=lambda p: "-".join(p),
)
def toy_pair(request, mix_paths):
    """(mix, dtype, weights="auto" LLM, weights="dequantize" LLM), no prefix caching; attention "native" runs
    the fused C layer, "torch" each linear on its own."""
    mix, dtype, attention = request.param
    _require_dtype(dtype)
    path = str(mix_paths[mix])
    kwargs = {"attention_backend": attention, "enable_prefix_caching": False}
    return mix, dtype, _llm(path, "auto", dtype, **kwargs), _llm(path, "dequantize", dtype, **kwargs)


def test_auto_equals_dequantize_one_at_a_time_and_batched(toy_pair):
    mix, dtype, auto, deq = toy_pair
    runs = {}
    for name, llm in (("auto", auto), ("dequantize", deq)):
        single = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
        batched = llm.generate(PROMPTS, GREEDY)
        _assert_sane(single + batched, GREEDY.max_tokens)
        runs[name] = (_results(single), _results(batched))
        assert llm.engine.get_stats().num_failed_batches == 0  # the batch ran as one, not retried one by one
    assert runs["auto"][0] == runs["dequantize"][0]  # one at a time
    assert runs["auto"][1] == runs["dequantize"][1]  # batched
    assert runs["auto"][1] == runs["auto"][0]  # and batching changes nothing under auto either


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", ["q4_0", "q4_k_m", "mixed"])
def test_prefix_cache_hits_change_nothing_under_auto(mix_paths, mix, dtype):
    """Requests sharing a cached prefix (partial hits, then whole-prompt hits, one at a time and batched, with
    prefills cut in chunks of 37 tokens) get the bits of a run without the cache."""
    _require_dtype(dtype)
    path = str(mix_paths[mix])
    prompts = [PROMPTS[4] + suffix for suffix in (" Q: why?", " Q: how so?", " A: 42!", " hi")]
    cold = _llm(path, "auto", dtype, enable_prefix_caching=False)
    reference = _results(cold.generate(prompts, CACHED))
    warm = _llm(path, "auto", dtype, enable_prefix_caching=True, max_num_batched_tokens=37)  # chunked prefill too
    tok = warm.tokenizer
    first = warm.generate(prompts[0], CACHED)[0]
    assert first.num_cached_tokens == 0
    for prompt, ref in zip(prompts[1:], reference[1:]):
        out = warm.generate(prompt, CACHED)[0]
        a, b = tok.encode(prompts[0]), tok.encode(prompt)
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert out.num_cached_tokens == common // 16 * 16 >= 32  # the shared full blocks
        assert _results([out]) == [ref]
    again = warm.generate(prompts, CACHED)  # every prompt cached but its last token
    assert [o.num_cached_tokens for o in again] == [(len(tok.encode(p)) - 1) // 16 * 16 for p in prompts]
    assert _results(again) == reference
    assert warm.engine.get_stats().num_failed_batches == 0


def test_auto_falls_back_to_dequantize_where_the_kernel_does_not_run(mix_paths, monkeypatch):
    """Without the linear kernel (as on a CPU without AVX-512) auto dequantizes at load, as dequantize does:
    it serves, with dequantize's bits and dequantize's memory."""
    from kvserve.model import native

    monkeypatch.setattr(native, "kernel_linear_available", lambda device, dtype: False)
    path = str(mix_paths["q4_k_m"])
    kwargs = {"linear_backend": "auto", "enable_prefix_caching": False}
    auto, deq = _llm(path, "auto", "float32", **kwargs), _llm(path, "dequantize", "float32", **kwargs)
    outs = auto.generate(PROMPTS, GREEDY)
    _assert_sane(outs, GREEDY.max_tokens)
    assert _results(outs) == _results(deq.generate(PROMPTS, GREEDY))
    assert _tensor_bytes(auto) == _tensor_bytes(deq)


# ------------------------------------------------------------------------------------- the bundled model
def _tensor_bytes(root: object) -> int:
    """Bytes of the distinct torch storages reachable from root through attributes and containers."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | type | None):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor) and obj.is_mkldnn:  # oneDNN's packed weights: no storage to share
            storages[("mkldnn", id(obj))] = obj.numel() * obj.element_size()
        elif isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storage.nbytes(), storages.get(storage.data_ptr(), 0))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))
    return sum(storages.values())


@pytest.fixture(scope="module", params=DTYPES)
def bundled_runs(request, bundled_path):
    """{weights: (bytes of tensors the LLM holds, outputs of the golden prompts batched)} in one dtype."""
    dtype = request.param
    _require_dtype(dtype)
    runs = {}
    for weights in ("auto", "dequantize"):
        llm = _llm(SMOLLM, weights, dtype)
        runs[weights] = (_tensor_bytes(llm), llm.generate(GOLDEN_PROMPTS, BUNDLED))
        del llm  # one 135M model at a time
    return dtype, runs


def test_bundled_model_auto_equals_dequantize(bundled_runs):
    dtype, runs = bundled_runs
    _assert_sane(runs["auto"][1], BUNDLED.max_tokens)
    assert _results(runs["auto"][1]) == _results(runs["dequantize"][1])


def test_bundled_model_auto_keeps_the_weights_quantized(bundled_runs):
    """auto holds the Q4_1 linears as stored (5 bits a weight) where dequantize holds them in the dtype: at
    least a quarter of the linears' dtype bytes less (30 layers of 3.54M weights), whatever else either keeps."""
    dtype, runs = bundled_runs
    weights_per_layer = 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3  # q, o; k, v; gate, up, down
    linear_bytes = 30 * weights_per_layer * getattr(torch, dtype).itemsize
    assert runs["auto"][0] < runs["dequantize"][0] - linear_bytes // 4, (runs["auto"][0], runs["dequantize"][0])


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_weights_choice_names_the_choices(mix_paths):
    with pytest.raises(ValueError, match="weights") as err:
        LLM(str(mix_paths["q8_0"]), weights="bogus")
    message = str(err.value)
    assert "auto" in message and "dequantize" in message and "bogus" in message, message
