"""From an OpenAI request to what the engine takes: prompts as token ids, and SamplingParams.

Prompts are tokenized here, on the event loop, not on the engine thread: the tokenizer is thread-safe and
its cost should not stall the step loop. Chat messages go through the model's chat template and are encoded
without adding special tokens again (the template already has them). The prompts are validated once, by the
engine when it accepts them (kvserve/errors.py); here only what OpenAI's API itself refuses (a max_tokens
beyond the context) and what SamplingParams refuses become 400s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams
from kvserve.server.errors import InvalidRequestError
from kvserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    SamplingRequest,
    ToolDef,
)
from kvserve.server.tools import tool_constraint


@dataclass(frozen=True)
class EngineInput:
    prompts: list[list[int]]
    params: SamplingParams


@dataclass(frozen=True)
class Limits:
    """What bounds a request's default length: the context and the KV pool, in tokens (from the engine)."""

    max_model_len: int
    kv_capacity_tokens: int

    def default_max_tokens(self, prompts: list[list[int]]) -> int:
        """Room left after the longest prompt; the engine rejects a prompt that leaves none."""
        room = min(self.max_model_len, self.kv_capacity_tokens) - max(len(p) for p in prompts)
        return max(room, 1)

    def check(self, prompts: list[list[int]], max_tokens: int, param: str) -> None:
        """As OpenAI does, refuse a max_tokens that cannot fit the context (the engine would cut it short; a
        prompt that leaves no room at all is the engine's context_length_exceeded)."""
        longest = max(len(p) for p in prompts)
        if longest < self.max_model_len < longest + max_tokens:
            raise InvalidRequestError(
                f"this model's context length is {self.max_model_len} tokens, but {longest + max_tokens} were "
                f"asked for ({longest} in the prompt, {max_tokens} to generate); lower {param}",
                param=param,
                code="context_length_exceeded",
            )


def completion_input(body: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> EngineInput:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    elif isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    if body.max_tokens is not None:
        limits.check(prompts, body.max_tokens, "max_tokens")
    max_tokens = body.max_tokens or limits.default_max_tokens(prompts)
    prompt_logprobs = body.logprobs if body.echo else None  # an echoed prompt's tokens are scored too
    return EngineInput(prompts, _params(body, max_tokens, body.logprobs, prompt_logprobs))


def echo_texts(body: CompletionRequest, prompts: list[list[int]]) -> list[tuple[str | None, list[int]]]:
    """Each prompt's text as echo shows it (a string prompt as sent; None for token ids, which the formatter
    decodes once the engine has accepted them) and its ids."""
    if isinstance(body.prompt, str):
        return [(body.prompt, prompts[0])]
    if body.prompt and isinstance(body.prompt[0], str):
        return list(zip(body.prompt, prompts))
    return [(None, p) for p in prompts]


def chat_text(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = True,
    *,
    tools: list[ToolDef] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation through the model's chat template (a 400 naming messages if the template refuses it).
    Tools, tool calls and tool results go in as the template takes them, or in kvserve's default (Hermes)
    format when it has no tool support (Tokenizer.render_chat)."""
    dicts = [m.template_dict() for m in messages]
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _TEMPLATE_RESERVED}
    try:
        return tokenizer.render_chat(
            dicts,
            tools=tool_dicts,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise InvalidRequestError(f"cannot apply the chat template: {e}", param="messages") from None


_TEMPLATE_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


def chat_input(body: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits) -> EngineInput:
    text = chat_text(
        body.messages,
        tokenizer,
        body.add_generation_prompt,
        tools=body.tools,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
    )
    prompts = [tokenizer.encode(text, add_special_tokens=False)]
    if body.max_new_tokens is not None:
        limits.check(
            prompts, body.max_new_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        )
    max_tokens = body.max_new_tokens or limits.default_max_tokens(prompts)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return EngineInput(prompts, _params(body, max_tokens, logprobs, structured=_tool_structured(body)))


def _tool_structured(body: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """tool_choice required or a named function: decoding constrained to calls whose arguments validate."""
    choice = body.effective_tool_choice
    if choice in ("none", "auto"):
        return None
    if body.structured_outputs is not None or (body.response_format and body.response_format.type != "text"):
        raise InvalidRequestError(
            "tool_choice required or a named function cannot be combined with response_format or structured_outputs",
            param="tool_choice",
        )
    assert body.tools
    name = choice.function.name if isinstance(choice, NamedToolChoice) else None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    return tool_constraint(tools, name, parallel=body.parallel_tool_calls is not False)


def _structured(body: SamplingRequest) -> StructuredOutputsParams | None:
    """response_format (OpenAI) or structured_outputs (vLLM) as the engine's StructuredOutputsParams."""
    rf, so = body.response_format, body.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise InvalidRequestError("send one of response_format and structured_outputs", param="structured_outputs")
    if rf is not None and rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None
        return StructuredOutputsParams(json=rf.json_schema.schema_)
    if so is None:
        return None
    try:
        return StructuredOutputsParams(
            json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice, grammar=so.grammar
        )
    except ValueError as e:
        raise InvalidRequestError(str(e), param="structured_outputs") from None


def _params(
    body: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop_list,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.logit_bias or None,
            speculative=body.speculative,
            structured_outputs=structured or _structured(body),
            min_p=body.min_p or 0.0,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
    except ValueError as e:  # SamplingParams' messages start with the field's name
        name = str(e).split(maxsplit=1)[0] if str(e) else ""
        raise InvalidRequestError(str(e), param=name if name in type(body).model_fields else None) from None
