"""Tool calling: the constraint that forces a call, and the model's tool-call text out as OpenAI tool_calls.

The format is Hermes-style (the one Qwen2.5, Qwen3 and the Hermes models are trained on): each call is a JSON
object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines. How tools,
calls and results go into the prompt is kvserve/model/tool_format.py's (shared with ``LLM.chat``).

With ``tool_choice`` ``required`` or a named function, decoding is constrained (llguidance, through the engine's
structured outputs) to one call (or, with ``parallel_tool_calls``, one or more) in exactly that format whose
arguments validate against the function's parameters schema, so the parser below always finds them.

The parser reads text as it streams: text outside the tags is content, passed on as soon as it cannot be the
start of a tag; a call is passed on whole when its closing tag arrives. A whole response is parsed by the same
code, so streamed deltas join to the response that is not streamed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvserve.model.tool_format import CLOSE, OPEN
from kvserve.sampling_params import StructuredOutputsParams

# ------------------------------------------------------------------------------------------ the constraint


def tool_constraint(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> StructuredOutputsParams:
    """A grammar (Lark, llguidance) for tool_choice required (any listed function; several calls when
    `parallel`) or a named function (exactly one call of it): <tool_call> JSON whose name is the function's
    and whose arguments validate against its parameters schema."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    bodies = [_call_schema(t["function"]) for t in chosen]
    schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    call = f"{json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}"
    start = 'call ("\\n" call)*' if parallel and name is None else "call"
    grammar = f"start: {start}\ncall: {call}\nbody: %json {json.dumps(schema)}\n"
    return StructuredOutputsParams(grammar=grammar)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------------------------- the parser


@dataclass(frozen=True)
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ToolCallParser:
    """One choice's text, fed as it streams, split into content and tool calls. feed() returns what can be
    passed on now (content text, complete calls); finish() what is left when the choice ends."""

    _pending: str = ""  # text not passed on yet: a possible tag start, or the body of an open call
    _held_space: str = ""  # whitespace outside the calls, passed on only when more content follows it
    _inside: bool = False
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._pending += text
        content, calls = [], []
        while True:
            if self._inside:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
                self._inside = False
                call = self._parse(body)
                if call is None:  # not a call after all: its text is content
                    content.append(self._content(OPEN + body + CLOSE))
                else:
                    calls.append(call)
            else:
                start = self._pending.find(OPEN)
                if start < 0:
                    keep = _partial_tag(self._pending)
                    content.append(self._content(self._pending[: len(self._pending) - keep]))
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                content.append(self._content(self._pending[:start]))
                self._pending = self._pending[start + len(OPEN) :]
                self._inside = True
        return "".join(content), calls

    def finish(self) -> str:
        """The rest as content: an unclosed call's text, a partial tag; the held whitespace only when no call
        was made (then the content is exactly the model's text)."""
        rest = (OPEN if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        out = self._content(rest)
        space, self._held_space = self._held_space, ""
        return out + ("" if self.calls else space)

    def _content(self, text: str) -> str:
        if not text:
            return ""
        if not text.strip():
            self._held_space += text
            return ""
        out, self._held_space = self._held_space + text, ""
        stripped = out.rstrip()
        if len(stripped) < len(out):  # trailing whitespace waits for what follows
            self._held_space = out[len(stripped) :]
        return stripped

    def _parse(self, body: str) -> ParsedCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = ParsedCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", obj["name"], text)
        self.calls.append(call)
        return call


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of the opening tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


def parse_whole(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole choice's text: its content (None when it made calls and said nothing else) and its calls."""
    parser = ToolCallParser()
    content, _ = parser.feed(text)
    content += parser.finish()
    return (content or None) if parser.calls else content, parser.calls
