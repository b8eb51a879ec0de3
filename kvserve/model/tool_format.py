"""Tools, tool calls and tool results into a chat prompt (the server's chat endpoint and ``LLM.chat``).

The format is Hermes-style (the one Qwen2.5, Qwen3 and the Hermes models are trained on): each call is a JSON
object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>`` lines, and each tool
result goes back between ``<tool_response>`` tags. A chat template that renders tools itself (it reads the
``tools`` variable) gets the tools, the assistant ``tool_calls`` and the ``tool`` messages as transformers passes
them (native_messages). A template that does not (the bundled SmolLM2's) gets the default rendering
(template_messages): the tool signatures and the format in the system message, earlier calls as ``<tool_call>``
text in the assistant turns, and tool results as ``<tool_response>`` text in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"

_SYSTEM_TOOLS = """# Tools

You can call functions to help answer. Their signatures, one JSON object per line:
<tools>
{signatures}
</tools>

To call a function, answer with a JSON object holding its name and arguments between <tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>"""


# ------------------------------------------------------------------------------------------- into the prompt


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages (as OpenAI sends them, dicts) rendered for a template without tool support: the tool
    signatures into the system message, assistant tool_calls as <tool_call> text, tool results as
    <tool_response> text in a user turn (consecutive results share one)."""
    out: list[dict[str, Any]] = []
    if tools:
        block = _SYSTEM_TOOLS.format(signatures="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [_call_text(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in m["tool_calls"]]
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: tool-call arguments as objects (templates write them
    with tojson; OpenAI sends them as JSON text), as vLLM and transformers pass them."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _arguments(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments  # not JSON: kept as the text the client sent
    return arguments


def _call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"
