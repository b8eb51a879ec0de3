"""OpenAI wire schemas (pydantic v2) for /v1/completions, /v1/chat/completions and /v1/models.

Requests are strict (``"5"`` is not an int). A field kvserve does not know at the top of a completion or chat
request is ignored with a warning logged once per name, as vLLM does (clients and routers written for vLLM or
SGLang add their own); everywhere else (nested objects, /tokenize) an unknown field is a 400. An OpenAI field
that kvserve knows but does not implement is rejected by name unless it carries its neutral value
(``functions: []``, ``service_tier: "auto"``), so a client never gets silently different behaviour.
Extensions beyond OpenAI (as vLLM names them): top_k, min_p, min_tokens, ignore_eos, stop_token_ids,
repetition_penalty, skip_special_tokens, include_stop_str_in_output, cache_salt, speculative,
structured_outputs, and for chat chat_template_kwargs, add_generation_prompt, continue_final_message.
The schemas of the answers are in protocol_out.py.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from kvserve.sampling_params import SEED_MAX, SEED_MIN
from kvserve.server.errors import InvalidRequestError, validation_message

T = TypeVar("T", bound=BaseModel)

log = logging.getLogger(__name__)


def parse_request(raw: bytes, cls: type[T]) -> T:
    """Parse a JSON body into a request model (whatever the Content-Type, so `curl -d` works); 400 if bad."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, an integer of > 4,300 digits
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError("the request body nests JSON too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):  # the only way a surrogate gets in; rare, so the walk below is too
        _check_unicode(data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise InvalidRequestError(message, param=param) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of a UTF-16 surrogate, paired or not


def _check_unicode(data: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); Python then holds a string no UTF-8 text (and no
    tokenizer) accepts. Refuse it up front, wherever it is. Iterative: json.loads bounds the nesting already."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    "the request contains a lone UTF-16 surrogate escape (such as \\ud800): not valid Unicode"
                ) from None
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


# ------------------------------------------------------------------------------------------------- requests


def _reject_unsupported(data: Any, neutral: dict[str, tuple[Any, ...]]) -> Any:
    """Drop fields we don't implement when they hold a neutral value; reject them otherwise."""
    if not isinstance(data, dict):
        return data
    for name, allowed in neutral.items():
        if name in data:
            if data[name] not in allowed:
                raise PydanticCustomError(
                    "unsupported_field",
                    "{param} is not supported by kvserve (allowed only as {allowed})",
                    {"param": name, "allowed": " or ".join(json.dumps(a) for a in allowed)},
                )
            data = {k: v for k, v in data.items() if k != name}
    return data


_NEUTRAL_COMPLETION: dict[str, tuple[Any, ...]] = {"best_of": (None, 1), "suffix": (None,)}
_NEUTRAL_CHAT: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),  # vLLM's chat echo (the last message in front) is not implemented
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


_NULL_MEANS_DEFAULT = (
    "n",
    "stream",
    "logprobs",
    "min_tokens",
    "ignore_eos",
    "echo",
    "speculative",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "add_generation_prompt",
    "continue_final_message",
)

_warned_fields: set[str] = set()


def _drop_unknown(cls: type[BaseModel], data: Any) -> Any:
    """vLLM's rule for a field it does not know: ignore it, and say so in the log once per name."""
    if not isinstance(data, dict):
        return data
    known = cls.model_fields.keys() | {f.alias for f in cls.model_fields.values() if f.alias}
    unknown = [k for k in data if k not in known]
    if not unknown:
        return data
    for name in unknown:
        if name not in _warned_fields and len(_warned_fields) < 1024:
            _warned_fields.add(name)
            log.warning("ignoring the request field %r: kvserve does not know it (warned once per name)", name)
    return {k: v for k, v in data.items() if k in known}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise PydanticCustomError("invalid_value", "{param} needs json_schema.schema", {"param": "response_format"})
        return self


class StructuredOutputsRequest(_Strict):
    """vLLM's structured_outputs: exactly one of json (a schema), json_object, regex, choice, grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingRequest(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1 mean off
    min_tokens: int = Field(0, ge=0)  # extension
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # extension (vLLM, transformers' definition)
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys are) -> -100..100
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = Field(None, min_length=1)  # extension: isolates one tenant's cached prefixes
    speculative: bool = True  # extension: false opts out of the server's --speculative (tokens are the same)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None  # extension (vLLM's)
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    skip_special_tokens: bool = True  # extension
    include_stop_str_in_output: bool = False  # extension
    neutral_fields: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's API (and clients such as LangChain and LiteLLM) send an explicit null for "the default".
        Unknown fields are dropped here too (logged once per name); the neutral checks run after this."""
        data = _drop_unknown(cls, _reject_unsupported(data, cls.neutral_fields))
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in _NULL_MEANS_DEFAULT):
            data = {k: v for k, v in data.items() if not (k in _NULL_MEANS_DEFAULT and v is None)}
        return data

    @model_validator(mode="after")
    def _check_common(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "invalid_value", "{param} is only allowed when stream is true", {"param": "stream_options"}
            )
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise PydanticCustomError("invalid_value", "{param} strings must be non-empty", {"param": "stop"})
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt in front of the text; with logprobs, its tokens scored too

    neutral_fields: ClassVar[dict[str, tuple[Any, ...]]] = _NEUTRAL_COMPLETION


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Strict):
    name: str
    arguments: str | dict[str, Any]  # JSON text, as OpenAI sends it (an object is taken too)


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    """One message. Unknown keys are ignored (clients send back the assistant messages they received, with
    OpenAI's output-only fields such as refusal and annotations)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    @model_validator(mode="after")
    def _check_message(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError(
                "invalid_value", "a {role} message needs content", {"role": self.role, "field": "content"}
            )
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError(
                "invalid_value", "only assistant messages have tool_calls", {"field": "tool_calls"}
            )
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (developer is OpenAI's new name for system)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # default true, as OpenAI's
    chat_template_kwargs: dict[str, Any] | None = None  # extension: more variables for the chat template
    add_generation_prompt: bool = True  # extension
    continue_final_message: bool = False  # extension: the last (assistant) message is continued, not closed

    neutral_fields: ClassVar[dict[str, tuple[Any, ...]]] = _NEUTRAL_CHAT

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "invalid_value", "{param} requires logprobs to be true", {"param": "top_logprobs"}
            )
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise PydanticCustomError(
                "invalid_value", "{param} and max_tokens disagree; send one", {"param": "max_completion_tokens"}
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise PydanticCustomError(
                "invalid_value",
                "{param} needs add_generation_prompt to be false",
                {"param": "continue_final_message"},
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise PydanticCustomError(
                "invalid_value", "{param} needs an assistant message last", {"param": "continue_final_message"}
            )
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            raise PydanticCustomError("invalid_value", "{param} lists a function name twice", {"param": "tools"})
        choice = self.tool_choice
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            if not names:
                raise PydanticCustomError(
                    "invalid_value", "{param} needs tools to choose from", {"param": "tool_choice"}
                )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError(
                "invalid_value",
                "{param} names the function {name}, which is not in tools",
                {"param": "tool_choice", "name": json.dumps(choice.function.name)},
            )
        for t in self.tools or ():
            if t.function.parameters is not None and t.function.parameters.get("type", "object") != "object":
                raise PydanticCustomError(
                    "invalid_value",
                    "{param}: the parameters of {name} must be an object schema",
                    {"param": "tools", "name": t.function.name},
                )

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: auto when there are tools, none otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True  # messages only
    tools: list[ToolDef] | None = None  # messages only: rendered as the chat request renders them
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("invalid_value", "send exactly one of prompt and messages", {})
        if self.messages is not None and not self.messages:
            raise PydanticCustomError("invalid_value", "{param} must not be empty", {"param": "messages"})
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
