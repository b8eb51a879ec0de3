"""From engine outputs to OpenAI responses and stream chunks, for completions and for chat.

The engine's outputs are deltas already (text it emits is final: it holds back what could start a stop
string). ChoiceTracker passes them on per choice, joins the tokens of steps that made no text yet onto the
next delta, and assembles whole choices for responses that are not streamed. A formatter (one per
endpoint) shapes deltas into chunks and the whole choices into a response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from kvserve.server.protocol_out import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    FunctionCallDelta,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from kvserve.server.tools import ParsedCall, ToolCallParser, parse_whole


@dataclass
class Delta:
    """What one choice produced since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    first: bool = False  # the choice's first delta: an echoed prompt goes in front of it
    prompt_logprobs: list[float | None] | None = None  # with the first delta, when the prompt was scored
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class _ChoiceState:
    started: bool = False
    num_tokens: int = 0
    last: RequestOutput | None = None
    pending: Delta | None = None  # tokens whose text is not sendable yet (held back by the engine)
    whole: OutputAccumulator | None = None  # the whole choice, for a response that is not streamed


@dataclass
class ChoiceTracker:
    """The engine's delta outputs, choice by choice: what to send now (streaming) or the whole choices at the
    end. Work per output is proportional to what it adds."""

    num_choices: int
    n: int  # choices per prompt; choice i * n + k is prompt i's k-th
    keep_whole: bool = True  # assemble each whole choice (a response that is not streamed)
    _choices: list[_ChoiceState] = field(init=False)

    def __post_init__(self) -> None:
        self._choices = [
            _ChoiceState(whole=OutputAccumulator() if self.keep_whole else None) for _ in range(self.num_choices)
        ]

    def update(self, index: int, out: RequestOutput) -> Delta | None:
        """Record a new output of choice `index`; the delta to send, or None while nothing is sendable."""
        state = self._choices[index]
        state.last = out
        if state.whole is not None:
            state.whole.add(out)
        c = out.outputs[0]
        state.num_tokens += len(c.token_ids)
        delta = Delta(
            index=index,
            text=c.text,
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            top_logprobs=c.top_logprobs,
            finish_reason=c.finish_reason,
            first=not state.started,
            prompt_logprobs=out.prompt_logprobs if not state.started else None,
            prompt_top_logprobs=out.prompt_top_logprobs if not state.started else None,
        )
        if state.pending is not None:  # tokens of earlier steps that made no text go with this one
            delta = _join(state.pending, delta)
            state.pending = None
        if not delta.text and not c.finished:
            state.pending = delta
            return None
        state.started = True
        return delta

    def final_delta(self, index: int) -> Delta:
        """The whole choice as one delta (for a response that is not streamed)."""
        last = self._whole(index)
        c = last.outputs[0]
        return Delta(
            index,
            c.text,
            c.token_ids,
            c.logprobs,
            c.top_logprobs,
            c.finish_reason,
            first=True,
            prompt_logprobs=last.prompt_logprobs,
            prompt_top_logprobs=last.prompt_top_logprobs,
        )

    def final(self, index: int) -> CompletionOutput:
        return self._whole(index).outputs[0]

    def _whole(self, index: int) -> RequestOutput:
        state = self._choices[index]
        assert state.whole is not None and state.last is not None and state.last.finished, f"choice {index} open"
        return state.whole.result()

    def usage(self) -> Usage:
        prompt = cached = completion = 0
        for index, state in enumerate(self._choices):
            if state.last is None:
                continue
            completion += state.num_tokens
            if index % self.n == 0:  # the prompt counts once for its n samples
                prompt += len(state.last.prompt_token_ids)
                cached += state.last.num_cached_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


def _join(a: Delta, b: Delta) -> Delta:
    """Two consecutive deltas of one choice as one."""

    def cat(x: list | None, y: list | None) -> list | None:
        return None if x is None and y is None else (x or []) + (y or [])

    return Delta(
        a.index,
        a.text + b.text,
        a.token_ids + b.token_ids,
        cat(a.logprobs, b.logprobs),
        cat(a.top_logprobs, b.top_logprobs),
        b.finish_reason,
        first=a.first,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        prompt_top_logprobs=a.prompt_top_logprobs if a.prompt_top_logprobs is not None else b.prompt_top_logprobs,
    )


def _finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


class CompletionFormatter:
    """echo: each prompt's (text, token ids), put in front of its choices' text (and, with logprobs, its tokens
    with their prompt logprobs, the first one None), as OpenAI's legacy completions and vLLM do."""

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: Tokenizer,
        echo: list[tuple[str | None, list[int]]] | None = None,
        n: int = 1,
    ):
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.id = f"cmpl-{request_id}"
        self._offsets: dict[int, int] = {}
        self.echo, self.n = echo, n

    def start_chunks(self, num_choices: int) -> list[CompletionResponse]:
        return []

    def chunks(self, d: Delta) -> list[CompletionResponse]:
        d = self._echoed(d)
        choice = CompletionChoice(
            index=d.index, text=d.text, logprobs=self._logprobs(d), finish_reason=_finish(d.finish_reason)
        )
        return [CompletionResponse(id=self.id, model=self.model, choices=[choice])]

    def _echoed(self, d: Delta) -> Delta:
        if self.echo is None or not d.first:
            return d
        text, ids = self.echo[d.index // self.n]
        if text is None:  # token ids: decoded now, after the engine accepted them (out-of-vocabulary ids are a 400)
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self.echo[d.index // self.n] = (text, ids)  # once for the prompt's n choices
        logprobs = tops = None
        if d.logprobs is not None:
            logprobs = list(d.prompt_logprobs or [None] * len(ids)) + d.logprobs
        if d.top_logprobs is not None:
            tops = list(d.prompt_top_logprobs or [None] * len(ids)) + d.top_logprobs
        return Delta(d.index, text + d.text, ids + d.token_ids, logprobs, tops, d.finish_reason)

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, choices=[], usage=usage)

    def response(self, tracker: ChoiceTracker) -> CompletionResponse:
        choices = []
        for index in range(tracker.num_choices):
            d = self._echoed(tracker.final_delta(index))
            choices.append(
                CompletionChoice(
                    index=index, text=d.text, logprobs=self._logprobs(d), finish_reason=_finish(d.finish_reason)
                )
            )
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage())

    def _logprobs(self, d: Delta) -> CompletionLogprobs | None:
        if d.logprobs is None:
            return None
        tokens = [_token_text(self.tokenizer, t) for t in d.token_ids]
        offsets, pos = [], self._offsets.get(d.index, 0)
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        self._offsets[d.index] = pos
        tops = None
        if d.top_logprobs is not None:
            tops = [
                None if top is None else {_token_text(self.tokenizer, t): lp for t, lp in top.items()}
                for top in d.top_logprobs
            ]
        return CompletionLogprobs(tokens=tokens, token_logprobs=d.logprobs, top_logprobs=tops, text_offset=offsets)


class ChatFormatter:
    """parse_tools: the request offered tools (tool_choice not none), so each choice's text is parsed for tool
    calls (kvserve/server/tools.py): calls become tool_calls and the finish reason tool_calls."""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, parse_tools: bool = False):
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.id = f"chatcmpl-{request_id}"
        self.parse_tools = parse_tools
        self._parsers: dict[int, ToolCallParser] = {}

    def start_chunks(self, num_choices: int) -> list[ChatCompletionChunk]:
        """OpenAI opens each choice's stream with the role and empty content."""
        choices = [
            ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(num_choices)
        ]
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[c]) for c in choices]

    def chunks(self, d: Delta) -> list[ChatCompletionChunk]:
        finish = _finish(d.finish_reason)
        if not self.parse_tools:
            delta = DeltaMessage(content=d.text)
        else:
            parser = self._parsers.setdefault(d.index, ToolCallParser())
            content, calls = parser.feed(d.text)
            if d.finish_reason is not None:
                content += parser.finish()
                finish = "tool_calls" if parser.calls and finish == "stop" else finish
            if not content and not calls and finish is None and d.logprobs is None:
                return []  # held back: it may be the start of a call
            tool_calls = [_call_delta(c) for c in calls] or None
            delta = DeltaMessage(content=content if content or not tool_calls else None, tool_calls=tool_calls)
        choice = ChatStreamChoice(index=d.index, delta=delta, logprobs=self._logprobs(d), finish_reason=finish)
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])]

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage)

    def response(self, tracker: ChoiceTracker) -> ChatCompletionResponse:
        choices = []
        for index in range(tracker.num_choices):
            c = tracker.final(index)
            d = Delta(index, c.text, c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason)
            finish = _finish(c.finish_reason)
            content: str | None = c.text
            tool_calls = None
            if self.parse_tools:
                content, calls = parse_whole(c.text)
                if calls:
                    tool_calls = [
                        ToolCallOut(id=x.id, function=FunctionCallOut(name=x.name, arguments=x.arguments))
                        for x in calls
                    ]
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(
                ChatChoice(
                    index=index,
                    message=ChatMessageOut(content=content, tool_calls=tool_calls),
                    logprobs=self._logprobs(d),
                    finish_reason=finish,
                )
            )
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage())

    def _logprobs(self, d: Delta) -> ChatLogprobs | None:
        if d.logprobs is None:
            return None
        content = []
        for k, (token_id, lp) in enumerate(zip(d.token_ids, d.logprobs)):
            top = d.top_logprobs[k] if d.top_logprobs is not None and k < len(d.top_logprobs) else {}
            text = _token_text(self.tokenizer, token_id)
            alternatives = [_top(self.tokenizer, t, v) for t, v in sorted(top.items(), key=lambda kv: -kv[1])]
            raw = list(self.tokenizer.token_bytes(token_id))
            content.append(ChatTokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=alternatives))
        return ChatLogprobs(content=content)


def _call_delta(call: ParsedCall) -> ToolCallDelta:
    """A whole call as one streamed delta (id, name and all its arguments; OpenAI's clients join by index)."""
    return ToolCallDelta(
        index=call.index,
        id=call.id,
        type="function",
        function=FunctionCallDelta(name=call.name, arguments=call.arguments),
    )


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = _token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(tokenizer.token_bytes(token_id)))


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


Formatter = CompletionFormatter | ChatFormatter
