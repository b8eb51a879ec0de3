"""LLM: the offline Python API, in the shape vLLM users know.

from kvserve import LLM, SamplingParams
llm = LLM(model="smollm2-135m", enable_prefix_caching=True)
out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
print(out[0].outputs[0].text, out[0].num_cached_tokens)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from kvserve.config import EngineConfig
from kvserve.engine import LLMEngine, NewRequest
from kvserve.model.loader import LoadedModel
from kvserve.outputs import OutputAccumulator, RequestOutput
from kvserve.sampling_params import SamplingParams

Prompt = str | list[int]  # also vLLM's {"prompt": str} and {"prompt_token_ids": [int, ...]}


def _is_token_ids(x: Any) -> bool:
    return (
        not isinstance(x, str | bytes | Mapping)
        and hasattr(x, "__len__")
        and len(x) > 0
        and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x)
    )


def _one_prompt(x: Any) -> str | list[int]:
    """A string, token ids (a list, tuple or array of integers) or vLLM's TextPrompt / TokensPrompt dict."""
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        keys = set(x)
        if keys == {"prompt"} and isinstance(x["prompt"], str):
            return x["prompt"]
        if keys == {"prompt_token_ids"} and (_is_token_ids(x["prompt_token_ids"]) or len(x["prompt_token_ids"]) == 0):
            return [int(t) for t in x["prompt_token_ids"]]
        raise ValueError(
            f"a dict prompt is {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, got keys {sorted(keys)}"
        )
    if _is_token_ids(x):
        return [int(t) for t in x]
    if isinstance(x, list | tuple) and len(x) == 0:
        return []  # the engine's clear "the prompt is empty"
    raise TypeError(f"a prompt is a string, a list of token ids or a prompt dict, got {type(x).__name__}")


def _prompts(prompts: Any) -> list[str | list[int]]:
    """generate()'s first argument as a list of prompts: one prompt, or a sequence of them."""
    if isinstance(prompts, str | Mapping) or _is_token_ids(prompts):
        return [_one_prompt(prompts)]
    if isinstance(prompts, bytes) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    return [_one_prompt(p) for p in prompts]


class LLM:
    def __init__(self, model: str = "smollm2-135m", *, loaded: LoadedModel | None = None, **kwargs):
        """kwargs are EngineConfig fields (dtype, block_size, enable_prefix_caching, ...)."""
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise ValueError(f"unknown LLM option(s) {sorted(unknown)}; valid: {EngineConfig.field_names()}")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config, loaded=loaded)
        self.tokenizer = self.engine.get_tokenizer()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string, a list of token ids, or vLLM's {"prompt": ...} /
        {"prompt_token_ids": ...} dicts); one prompt or a list of them; outputs come back in prompt order."""
        prompts = _prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        engine = self.engine
        children: list[list[str]] = []
        new: list[NewRequest] = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            ids = [f"gen-{id(self)}-{i}-{k}" for k in range(params.n)]
            children.append(ids)
            for k, rid in enumerate(ids):
                new.append(NewRequest(prompt, params if params.n == 1 else params.child(k), rid, cache_salt))
        added = engine.add_requests(new)  # all or none: a bad prompt is refused before any is queued
        outputs = {rid: OutputAccumulator() for rid in added}
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(added), desc="generate", disable=not use_tqdm, unit="req") as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        outputs[out.request_id].add(out)
                        if out.finished:
                            finished[out.request_id] = outputs.pop(out.request_id).result()
                            bar.update(1)
        except BaseException:
            for rid in added:
                engine.abort(rid)
            raise
        return [_merge([finished[r] for r in ids], prompt) for ids, prompt in zip(children, prompts)]

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = False,
        cache_salt: str | None = None,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate.

        As vLLM's ``LLM.chat``: messages as OpenAI sends them (assistant ``tool_calls``, ``tool`` messages),
        ``tools`` as OpenAI function tools (rendered by the template, or in kvserve's default Hermes format:
        docs/structured-outputs.md#tool-calling), ``chat_template_kwargs`` passed to the template. The output is
        the model's text; ask for a guaranteed call with ``SamplingParams(structured_outputs=...)``."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations or any(not c for c in conversations):
            raise ValueError("messages must hold at least one message per conversation")
        for conversation in conversations:
            for m in conversation:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ValueError(f"each message needs a 'role' (string), got {m!r}")
                if "content" not in m and not m.get("tool_calls"):
                    raise ValueError(f"each message needs a 'content' (or, from the assistant, 'tool_calls'): {m!r}")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        prompts = [
            self.tokenizer.render_chat(
                list(c),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            for c in conversations
        ]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm, cache_salt=cache_salt)


def _merge(outs: list[RequestOutput], prompt: Prompt) -> RequestOutput:
    first = outs[0]
    completions = []
    for k, out in enumerate(outs):
        c = out.outputs[0]
        c.index = k
        completions.append(c)
    first.outputs = completions
    first.prompt = prompt if isinstance(prompt, str) else None
    first.request_id = first.request_id.rsplit("-", 1)[0]
    return first
