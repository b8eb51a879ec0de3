"""Workloads: lists of BenchRequest, a pure function of (name, number of requests, seed), or read from a trace.

Who shares what is decided here, the text comes from scenes.py:

    shared-system-prompt  one ~1,000-token system prompt, then a short customer question each (chat)
    document-qa           a few ~2,000-token documents, many questions on each, interleaved (completions)
    multi-turn            conversations that resend their growing history; turn k waits for turn k-1 (chat)
    agent-loop            an agent's history with OpenAI tools, growing by a tool call and its result each step
                          (chat; every request sends the same `tools`)
    no-sharing            unique ~1,000-token prompts: caching cannot help here and must not hurt (completions)
    copy-edit             a ~400-token text to repeat with one word changed: the answer copies its prompt
                          (completions; what speculative decoding's drafts are made for)

A trace is JSONL, one request a line: {"prompt": str} or {"messages": [...]}, with optional "max_tokens",
"arrival_time" (seconds from the start of the run) and "tools" (OpenAI function tools, with messages).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvserve.bench import scenes
from kvserve.bench.corpus import prose, subject

SYSTEM_PROMPT_TOKENS = 1000
DOCUMENT_TOKENS = 2000
NUM_DOCUMENTS = 4
TURNS_PER_CONVERSATION = 4
AGENT_STEPS = 16
OBSERVATION_TOKENS = 120
UNIQUE_PROMPT_TOKENS = 1000
COPY_TEXT_TOKENS = 400

Message = dict[str, Any]  # role, content; tool_calls (assistant), tool_call_id (tool)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a prompt (completions) or messages (chat), never both."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    max_tokens: int | None = None  # None: the run's --max-tokens
    arrival_time: float | None = None  # seconds from the start (traces); None: the client's schedule
    depends_on: int | None = None  # index of the request whose answer must arrive before this one is sent
    group: str = ""  # what it shares a prefix with ("doc-2", "conv-5"), for reading results
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI function tools (chat only)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request needs exactly one of prompt and messages")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def num_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        calls = [c["function"]["arguments"] for m in self.messages or () for c in m.get("tool_calls") or ()]
        return sum(len(m.get("content") or "") for m in self.messages or ()) + sum(map(len, calls))


def _chat(*messages: Message, **kw) -> BenchRequest:
    return BenchRequest(messages=tuple(messages), **kw)


def shared_system_prompt(n: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    system = {"role": "system", "content": scenes.support_system_prompt(rng, SYSTEM_PROMPT_TOKENS)}
    return [_chat(system, {"role": "user", "content": scenes.support_question(rng)}, group="system") for _ in range(n)]


def document_qa(n: int, seed: int, num_documents: int = NUM_DOCUMENTS) -> list[BenchRequest]:
    rng = random.Random(seed)
    num_documents = max(1, min(num_documents, n))
    abouts = [subject(rng) for _ in range(num_documents)]
    docs = [
        scenes.document(rng, f"Report {i + 1}: {a['thing'].capitalize()} in {a['place']}", a, DOCUMENT_TOKENS)
        for i, a in enumerate(abouts)
    ]
    which = [i % num_documents for i in range(n)]
    rng.shuffle(which)  # questions on the documents arrive interleaved, as from many readers at once
    out = []
    for d in which:
        q = scenes.document_question(rng, abouts[d])
        prompt = (
            f"Read the following document and answer the question at the end.\n\n{docs[d]}\n\nQuestion: {q}\nAnswer:"
        )
        out.append(BenchRequest(prompt=prompt, group=f"doc-{d}"))
    return out


def multi_turn(n: int, seed: int, turns: int = TURNS_PER_CONVERSATION) -> list[BenchRequest]:
    """Turn-major order (every conversation's turn 0, then turn 1, ...), so a turn's parent is always earlier."""
    rng = random.Random(seed)
    num_conv = max(1, -(-n // turns))
    histories: list[list[Message]] = [[] for _ in range(num_conv)]
    last: list[int | None] = [None] * num_conv
    out: list[BenchRequest] = []
    for turn in range(turns):
        for c in range(num_conv):
            if len(out) == n:
                return out
            h = histories[c]
            if turn > 0:
                h.append({"role": "assistant", "content": scenes.assistant_reply(rng)})
            h.append({"role": "user", "content": scenes.opening_question(rng) if turn == 0 else scenes.follow_up(rng)})
            out.append(_chat(*h, depends_on=last[c], group=f"conv-{c}"))
            last[c] = len(out) - 1
    return out


def agent_loop(n: int, seed: int, steps: int = AGENT_STEPS) -> list[BenchRequest]:
    """Step-major order over ceil(n / steps) agents; each step resends the whole history plus the assistant's
    tool call and the tool's result (OpenAI's tool_calls and tool messages), with the same tools each time."""
    rng = random.Random(seed)
    tools = tuple(scenes.agent_tools())
    num_agents = max(1, -(-n // steps))
    histories = [
        [
            {"role": "system", "content": scenes.agent_system_prompt(scenes.agent_task(rng))},
            {"role": "user", "content": "Begin."},
        ]
        for _ in range(num_agents)
    ]
    last: list[int | None] = [None] * num_agents
    out: list[BenchRequest] = []
    for step in range(steps):
        for a in range(num_agents):
            if len(out) == n:
                return out
            h = histories[a]
            if step > 0:
                call = scenes.agent_call(rng, f"call_{a}_{step}")
                h.append({"role": "assistant", "content": None, "tool_calls": [call]})
                observation = scenes.agent_observation(rng, OBSERVATION_TOKENS)
                h.append({"role": "tool", "tool_call_id": call["id"], "content": observation})
            out.append(_chat(*h, depends_on=last[a], group=f"agent-{a}", tools=tools))
            last[a] = len(out) - 1
    return out


def no_sharing(n: int, seed: int) -> list[BenchRequest]:
    """Each prompt opens with its own ticket number, so not even the first KV block is shared."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ticket = f"Ticket {rng.randint(10**7, 10**8 - 1)}-{i} from {rng.choice(scenes.PLACES)}."
        body = prose(rng, UNIQUE_PROMPT_TOKENS - 30)
        out.append(BenchRequest(prompt=f"{ticket}\n\n{body}\n\nSummarize this ticket in one sentence:", group=f"u-{i}"))
    return out


def copy_edit(n: int, seed: int) -> list[BenchRequest]:
    """Each request gives a text of its own and asks for it again with one word replaced; the prompt ends with
    the first words of the copy, as an editor's completion request would."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = prose(rng, COPY_TEXT_TOKENS)
        words = [w for w in body.split() if w.isalpha() and len(w) > 4]
        old = rng.choice(words) if words else "the"
        new = old.upper()
        head = " ".join(body.split()[:6])
        prompt = f"Text:\n{body}\n\nThe same text, unchanged except that '{old}' becomes '{new}':\n{head}"
        out.append(BenchRequest(prompt=prompt, group=f"copy-{i}"))
    return out


WORKLOADS: dict[str, Callable[[int, int], list[BenchRequest]]] = {
    "shared-system-prompt": shared_system_prompt,
    "document-qa": document_qa,
    "multi-turn": multi_turn,
    "agent-loop": agent_loop,
    "no-sharing": no_sharing,
    "copy-edit": copy_edit,
}


def build_workload(name: str, num_requests: int, seed: int = 0) -> list[BenchRequest]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)} or give --trace")
    if num_requests < 1:
        raise ValueError("--num-requests must be at least 1")
    return WORKLOADS[name](num_requests, seed)


def load_trace(path: str | Path, limit: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL trace; a malformed line raises ValueError naming its line number."""
    out: list[BenchRequest] = []
    try:
        f = open(path)  # noqa: SIM115 - closed below; OSError becomes the CLI's clear error
    except OSError as e:
        raise ValueError(f"cannot read the trace {path}: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_trace_request(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if limit is not None and len(out) == limit:
                break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def _trace_request(obj: dict) -> BenchRequest:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    unknown = set(obj) - {"prompt", "messages", "max_tokens", "arrival_time", "tools"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    messages = obj.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(_trace_message(m) for m in messages):
            raise ValueError(
                "messages must be a list of {role, content} objects (content a string, or null with tool_calls)"
            )
        messages = tuple(dict(m) for m in messages)
    tools = obj.get("tools")
    if tools is not None:
        if messages is None or not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of objects, with messages")
        tools = tuple(tools)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError("max_tokens must be a positive integer")
    arrival = obj.get("arrival_time")
    if arrival is not None and (not isinstance(arrival, int | float) or arrival < 0):
        raise ValueError("arrival_time must be a non-negative number of seconds")
    return BenchRequest(prompt=prompt, messages=messages, max_tokens=max_tokens, arrival_time=arrival, tools=tools)


def _trace_message(m: Any) -> bool:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return False
    content = m.get("content")
    return isinstance(content, str) or (content is None and isinstance(m.get("tool_calls"), list))
